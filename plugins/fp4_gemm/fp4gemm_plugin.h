// TensorRT plugin "FP4Gemm" (namespace "export_engine", version "1"): the FP4Gemm node of
// docs/fp4gemm_contract.md on the kernels of fp4gemm.h. IPluginV3 with the OneCore / OneBuild /
// OneRuntime capabilities, and its IPluginCreatorV3One. See README.md in this folder.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "fp4gemm.h"

namespace export_engine {

constexpr char const* kFP4GemmName = "FP4Gemm";
constexpr char const* kFP4GemmVersion = "1";
constexpr char const* kFP4GemmNamespace = "export_engine";
constexpr int32_t kFP4GemmNbInputs = 9;

// Attributes as plugin fields: the ints of the node plus their serialized copy.
class FP4GemmFields {
public:
    explicit FP4GemmFields(fp4gemm_layer_t const& layer);
    nvinfer1::PluginFieldCollection const* collection() noexcept { return &mCollection; }

private:
    std::vector<int32_t> mBits, mSizes;
    std::vector<int32_t> mScalars;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

class FP4GemmPlugin final : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime {
public:
    explicit FP4GemmPlugin(fp4gemm_layer_t const& layer);
    FP4GemmPlugin(FP4GemmPlugin const& other);
    FP4GemmPlugin& operator=(FP4GemmPlugin const&) = delete;
    ~FP4GemmPlugin() override;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kFP4GemmName; }
    char const* getPluginVersion() const noexcept override { return kFP4GemmVersion; }
    char const* getPluginNamespace() const noexcept override { return kFP4GemmNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
        int32_t nbInputs, int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override { return mDescription.c_str(); }
    char const* getMetadataString() noexcept override { return mDescription.c_str(); }

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    fp4gemm_layer_t const& layer() const noexcept { return mLayer; }

private:
    bool allocateSemaphores() noexcept;

    fp4gemm_layer_t mLayer{};
    std::string mDescription;  // attributes in one line (timing cache id, metadata)
    FP4GemmFields mFields;
    int32_t mSmVersion{0};
    int32_t mNumSms{0};
    int32_t* mSemaphores{nullptr};  // per execution context (attachToContext), zeroed, self-resetting
};

class FP4GemmPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    FP4GemmPluginCreator();
    ~FP4GemmPluginCreator() override = default;

    char const* getPluginName() const noexcept override { return kFP4GemmName; }
    char const* getPluginVersion() const noexcept override { return kFP4GemmVersion; }
    char const* getPluginNamespace() const noexcept override { return kFP4GemmNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldNames; }
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldNames{};
};

// Parses plugin fields (the node's attributes) into a layer; false with a message on failure.
bool parseFP4GemmFields(nvinfer1::PluginFieldCollection const* fc, fp4gemm_layer_t* layer, std::string* error);

}  // namespace export_engine
