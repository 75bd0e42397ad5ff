// TensorRT plugin "FP4Gemm" (see fp4gemm_plugin.h and README.md).
#include "fp4gemm_plugin.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <sstream>

#include <cuda_runtime_api.h>

using namespace nvinfer1;

namespace export_engine {
namespace {

void logMessage(ILogger::Severity severity, std::string const& msg) noexcept {
    try {
        std::string const text = std::string("FP4Gemm plugin: ") + msg;
        if (ILogger* logger = getLogger()) {
            logger->log(severity, text.c_str());
        } else {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    } catch (...) {
    }
}

void logError(std::string const& msg) noexcept { logMessage(ILogger::Severity::kERROR, msg); }

// The scalar attributes, in field order.
constexpr char const* kScalarNames[] = {"in_features", "out_features", "a_signed", "a_ebits",
                                        "a_mbits", "a_bias", "a_max_code", "a_mode"};

int32_t* scalarSlot(fp4gemm_layer_t& l, int i) {
    int32_t* slots[] = {&l.in_features, &l.out_features, &l.a_signed, &l.a_ebits,
                        &l.a_mbits, &l.a_bias, &l.a_max_code, &l.a_mode};
    return slots[i];
}

bool readInts(PluginField const& f, std::vector<int64_t>* out) {
    out->clear();
    if (f.data == nullptr || f.length < 0) return false;
    for (int32_t i = 0; i < f.length; ++i) {
        switch (f.type) {
            case PluginFieldType::kINT8: out->push_back(static_cast<int8_t const*>(f.data)[i]); break;
            case PluginFieldType::kINT16: out->push_back(static_cast<int16_t const*>(f.data)[i]); break;
            case PluginFieldType::kINT32: out->push_back(static_cast<int32_t const*>(f.data)[i]); break;
            case PluginFieldType::kINT64: out->push_back(static_cast<int64_t const*>(f.data)[i]); break;
            default: return false;
        }
    }
    return true;
}

std::string describe(fp4gemm_layer_t const& l) {
    std::ostringstream s;
    s << "FP4Gemm K=" << l.in_features << " N=" << l.out_features << " groups=";
    for (int g = 0; g < l.num_groups; ++g) s << (g ? "," : "") << l.group_bits[g] << "b:" << l.group_sizes[g];
    s << " act=";
    if (l.a_ebits == 0) {
        s << "none";
    } else {
        s << (l.a_signed ? "" : "u") << "e" << l.a_ebits << "m" << l.a_mbits << "/b" << l.a_bias << "/c"
          << l.a_max_code << (l.a_mode ? "/dynamic" : "/static");
    }
    return s.str();
}

int64_t volumeExceptLast(Dims const& d) {
    int64_t v = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i) v *= d.d[i];
    return v;
}

fp4gemm_dtype_t toDtype(DataType t) {
    return t == DataType::kFLOAT ? FP4GEMM_F32 : (t == DataType::kHALF ? FP4GEMM_F16 : FP4GEMM_BF16);
}

// Checks a known (>= 0) extent against the expected one.
bool extentIs(int64_t got, int64_t want) { return got < 0 || got == want; }

}  // namespace

// ---- fields --------------------------------------------------------------------------------------
FP4GemmFields::FP4GemmFields(fp4gemm_layer_t const& layer)
    : mBits(layer.group_bits, layer.group_bits + layer.num_groups),
      mSizes(layer.group_sizes, layer.group_sizes + layer.num_groups) {
    fp4gemm_layer_t copy = layer;
    for (int i = 0; i < 8; ++i) mScalars.push_back(*scalarSlot(copy, i));
    for (int i = 0; i < 8; ++i) {
        mFields.emplace_back(kScalarNames[i], &mScalars[i], PluginFieldType::kINT32, 1);
    }
    mFields.emplace_back("group_bits", mBits.data(), PluginFieldType::kINT32, static_cast<int32_t>(mBits.size()));
    mFields.emplace_back("group_sizes", mSizes.data(), PluginFieldType::kINT32, static_cast<int32_t>(mSizes.size()));
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

bool parseFP4GemmFields(PluginFieldCollection const* fc, fp4gemm_layer_t* layer, std::string* error) {
    fp4gemm_layer_t l{};
    l.a_signed = 1;
    bool seen[8] = {};
    bool seenBits = false, seenSizes = false;
    int32_t nSizes = 0;
    std::vector<int64_t> v;
    if (fc == nullptr) {
        *error = "no plugin fields";
        return false;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr) continue;
        std::string const name(f.name);
        if (name == "plugin_namespace" || name == "plugin_version") continue;  // ONNX parser metadata
        int slot = -1;
        for (int k = 0; k < 8; ++k)
            if (name == kScalarNames[k]) slot = k;
        if (slot < 0 && name != "group_bits" && name != "group_sizes") continue;  // unknown: ignored
        if (!readInts(f, &v)) {
            *error = "field '" + name + "' must hold integers";
            return false;
        }
        if (slot >= 0) {
            if (v.size() != 1) {
                *error = "field '" + name + "' must hold one integer";
                return false;
            }
            *scalarSlot(l, slot) = static_cast<int32_t>(v[0]);
            seen[slot] = true;
        } else {
            if (v.empty() || v.size() > FP4GEMM_MAX_GROUPS) {
                *error = "field '" + name + "' must hold 1.." + std::to_string(FP4GEMM_MAX_GROUPS) + " integers";
                return false;
            }
            int32_t* dst = name == "group_bits" ? l.group_bits : l.group_sizes;
            for (size_t k = 0; k < v.size(); ++k) dst[k] = static_cast<int32_t>(v[k]);
            if (name == "group_bits") {
                seenBits = true;
                l.num_groups = static_cast<int32_t>(v.size());
            } else {
                seenSizes = true;
                nSizes = static_cast<int32_t>(v.size());
            }
        }
    }
    for (int k : {0, 1, 3}) {  // the other a_* fields default to a signed, static format
        if (!seen[k]) {
            *error = std::string("missing field '") + kScalarNames[k] + "'";
            return false;
        }
    }
    if (!seenBits || !seenSizes) {
        *error = "missing field 'group_bits' or 'group_sizes'";
        return false;
    }
    if (nSizes != l.num_groups) {
        *error = "group_bits and group_sizes differ in length";
        return false;
    }
    if (fp4gemm_check_layer(&l) != FP4GEMM_OK) {
        *error = fp4gemm_last_error_message();
        return false;
    }
    *layer = l;
    return true;
}

// ---- plugin --------------------------------------------------------------------------------------
FP4GemmPlugin::FP4GemmPlugin(fp4gemm_layer_t const& layer)
    : mLayer(layer), mDescription(describe(layer)), mFields(layer) {}

FP4GemmPlugin::FP4GemmPlugin(FP4GemmPlugin const& other)
    : mLayer(other.mLayer), mDescription(other.mDescription), mFields(other.mLayer),
      mSmVersion(other.mSmVersion), mNumSms(other.mNumSms) {}

FP4GemmPlugin::~FP4GemmPlugin() {
    if (mSemaphores != nullptr) cudaFree(mSemaphores);  // errors at process teardown are moot
}

IPluginCapability* FP4GemmPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* FP4GemmPlugin::clone() noexcept {
    try {
        return new FP4GemmPlugin(*this);
    } catch (std::exception const& e) {
        logError(std::string("clone: ") + e.what());
        return nullptr;
    }
}

int32_t FP4GemmPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kFP4GemmNbInputs) {
        logError("expects 9 inputs and 1 output, got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return -1;
    }
    outputTypes[0] = inputTypes[0];  // Y has X's dtype
    return 0;
}

int32_t FP4GemmPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
    if (nbInputs != kFP4GemmNbInputs || nbOutputs != 1) {
        logError("expects 9 inputs (X, W, w_scale, w_lut, a_scale, a_zero, bias, perm, adapter) and 1 output");
        return -1;
    }
    if (inputs[0].nbDims < 1) {
        logError("X must have at least one dimension ([..., in_features])");
        return -1;
    }
    outputs[0] = inputs[0];
    outputs[0].d[inputs[0].nbDims - 1] = exprBuilder.constant(mLayer.out_features);
    return 0;
}

bool FP4GemmPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kFP4GemmNbInputs || nbOutputs != 1 || pos < 0 || pos > kFP4GemmNbInputs) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
        case 0: return d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
        case 1: return d.type == DataType::kINT8;                                  // packed codes
        case 7: return d.type == DataType::kINT32;                                 // perm
        case 8: return d.type == DataType::kINT64 || d.type == DataType::kINT32;   // adapter
        case 9: return d.type == inOut[0].desc.type;                               // Y
        default: return d.type == DataType::kFLOAT;  // w_scale, w_lut, a_scale, a_zero, bias
    }
}

int32_t FP4GemmPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kFP4GemmNbInputs || nbOutputs != 1) {
        logError("expects 9 inputs and 1 output");
        return -1;
    }
    int64_t const K = mLayer.in_features, N = mLayer.out_features;
    std::string problem;
    Dims const& x = in[0].desc.dims;
    if (x.nbDims < 1 || !extentIs(x.d[x.nbDims - 1], K)) {
        problem = "X's last dimension must be in_features=" + std::to_string(K);
    }
    Dims const& w = in[1].desc.dims;
    int64_t const B = fp4gemm_adapter_bytes(&mLayer);
    if (problem.empty() && (w.nbDims != 2 || !extentIs(w.d[1], B))) {
        problem = "W must be [adapters, " + std::to_string(B) + "] (INT8 packed codes of the layout)";
    }
    auto isVector = [](Dims const& d, int64_t n) { return d.nbDims == 1 && extentIs(d.d[0], n); };
    auto isScalar = [](Dims const& d) { return d.nbDims == 0 || (d.nbDims == 1 && extentIs(d.d[0], 1)); };
    if (problem.empty() && !isVector(in[2].desc.dims, N)) problem = "w_scale must be [out_features]";
    Dims const& lut = in[3].desc.dims;
    if (problem.empty() && (lut.nbDims != 2 || !extentIs(lut.d[0], mLayer.num_groups) || !extentIs(lut.d[1], 256))) {
        problem = "w_lut must be [" + std::to_string(mLayer.num_groups) + ", 256]";
    }
    if (problem.empty() && (!isScalar(in[4].desc.dims) || !isScalar(in[5].desc.dims) || !isScalar(in[8].desc.dims))) {
        problem = "a_scale, a_zero and adapter must be scalars";
    }
    if (problem.empty() && !isVector(in[6].desc.dims, N)) problem = "bias must be [out_features]";
    if (problem.empty() && !isVector(in[7].desc.dims, N)) problem = "perm must be [out_features]";
    if (!problem.empty()) {
        logError(problem + " (" + mDescription + ")");
        return -1;
    }
    return 0;
}

size_t FP4GemmPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept {
    if (nbInputs < 1) return 0;
    int64_t const maxM = std::max<int64_t>(volumeExceptLast(inputs[0].max), 1);
    fp4gemm_dtype_t const dtype = toDtype(inputs[0].desc.type);
    // Enough for any device the engine may run on: the largest over the architectures' plans
    // (a plan for fewer rows or another device never needs more, fp4gemm_workspace_size).
    size_t bytes = 0;
    for (int32_t sm : {75, 80, 89, 90}) {
        fp4gemm_plan_t plan{};
        if (fp4gemm_make_plan(&mLayer, maxM, dtype, FP4GEMM_PATH_AUTO, sm, 256, &plan) == FP4GEMM_OK) {
            bytes = std::max(bytes, fp4gemm_workspace_size(&mLayer, &plan));
        }
    }
    return bytes;
}

int32_t FP4GemmPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept {
    if (nbInputs != kFP4GemmNbInputs) return -1;
    if (in[0].dims.nbDims < 1 || in[0].dims.d[in[0].dims.nbDims - 1] != mLayer.in_features) {
        logError("X's last dimension must be in_features=" + std::to_string(mLayer.in_features));
        return -1;
    }
    return 0;
}

bool FP4GemmPlugin::allocateSemaphores() noexcept {
    fp4gemm_plan_t plan{};
    if (fp4gemm_make_plan(&mLayer, fp4gemm_smallm_max_m(), FP4GEMM_F16, FP4GEMM_PATH_AUTO, 90, 256, &plan) != FP4GEMM_OK) {
        return false;
    }
    size_t const n = fp4gemm_semaphore_count(&mLayer, &plan);
    if (n == 0) return true;
    void* p = nullptr;
    if (cudaMalloc(&p, n * sizeof(int32_t)) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (cudaMemset(p, 0, n * sizeof(int32_t)) != cudaSuccess) {
        cudaFree(p);
        cudaGetLastError();
        return false;
    }
    mSemaphores = static_cast<int32_t*>(p);
    return true;
}

IPluginV3* FP4GemmPlugin::attachToContext(IPluginResourceContext*) noexcept {
    try {
        auto* plugin = new FP4GemmPlugin(*this);
        if (!plugin->allocateSemaphores()) {  // the small-M path then runs without cross-CTA split-K
            logMessage(ILogger::Severity::kWARNING, "no split-K semaphores (cudaMalloc failed)");
        }
        return plugin;
    } catch (std::exception const& e) {
        logError(std::string("attachToContext: ") + e.what());
        return nullptr;
    }
}

int32_t FP4GemmPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    if (mSmVersion == 0) {
        int dev = 0, major = 0, minor = 0, sms = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            logError("cannot query the CUDA device");
            return -1;
        }
        mSmVersion = major * 10 + minor;
        mNumSms = sms;
    }
    fp4gemm_problem_t p{};
    p.M = volumeExceptLast(inputDesc[0].dims);
    p.dtype = toDtype(inputDesc[0].type);
    p.num_adapters = static_cast<int32_t>(inputDesc[1].dims.d[0]);
    p.x = inputs[0];
    p.w = inputs[1];
    p.w_scale = static_cast<float const*>(inputs[2]);
    p.w_lut = static_cast<float const*>(inputs[3]);
    p.a_scale = static_cast<float const*>(inputs[4]);
    p.a_zero = static_cast<float const*>(inputs[5]);
    p.bias = static_cast<float const*>(inputs[6]);
    p.perm = static_cast<int32_t const*>(inputs[7]);
    p.adapter = inputs[8];
    p.adapter_is_int32 = inputDesc[8].type == DataType::kINT32 ? 1 : 0;
    p.y = outputs[0];

    fp4gemm_plan_t plan{};
    int status = fp4gemm_make_plan(&mLayer, p.M, p.dtype, FP4GEMM_PATH_AUTO, mSmVersion, mNumSms, &plan);
    if (status == FP4GEMM_OK) {
        // TensorRT sized the workspace with getWorkspaceSize for the profile's largest M, which
        // covers this plan's needs
        size_t const bytes = fp4gemm_workspace_size(&mLayer, &plan);
        status = fp4gemm_run(&mLayer, &p, &plan, workspace, bytes, mSemaphores, stream);
    }
    if (status != FP4GEMM_OK) {
        logError(std::string(fp4gemm_status_string(status)) + ": " + fp4gemm_last_error_message() + " (" + mDescription + ")");
        return -1;
    }
    return 0;
}

PluginFieldCollection const* FP4GemmPlugin::getFieldsToSerialize() noexcept { return mFields.collection(); }

// ---- creator -------------------------------------------------------------------------------------
FP4GemmPluginCreator::FP4GemmPluginCreator() {
    for (char const* name : kScalarNames) mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("group_bits", nullptr, PluginFieldType::kINT32, 0);
    mFields.emplace_back("group_sizes", nullptr, PluginFieldType::kINT32, 0);
    mFieldNames.nbFields = static_cast<int32_t>(mFields.size());
    mFieldNames.fields = mFields.data();
}

IPluginV3* FP4GemmPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
    try {
        fp4gemm_layer_t layer{};
        std::string error;
        if (!parseFP4GemmFields(fc, &layer, &error)) {
            logError(std::string("node '") + (name ? name : "?") + "': " + error);
            return nullptr;
        }
        return new FP4GemmPlugin(layer);
    } catch (std::exception const& e) {
        logError(std::string("createPlugin: ") + e.what());
        return nullptr;
    }
}

}  // namespace export_engine

// Registers the creator under the "export_engine" namespace. Returns 1 when it is registered.
//
// This is what REGISTER_TENSORRT_PLUGIN does, with one difference: the macro registers under the
// namespace "" (registerCreator(creator, "")), and a V3 creator whose getPluginNamespace() is not ""
// is then listed by the registry but found by no getCreator() lookup, so the ONNX parser (which
// looks the node's plugin_namespace up) would fall back to the function body. Seen with
// TensorRT-RTX 1.7 (tests/test_fp4gemm_plugin.py), whose registry is TensorRT's; registering under
// the namespace makes the creator reachable there.
extern "C" __attribute__((visibility("default"))) int export_engine_register_fp4gemm(void) {
    static export_engine::FP4GemmPluginCreator creator;
    IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr) return 0;
    if (registry->getCreator(export_engine::kFP4GemmName, export_engine::kFP4GemmVersion,
                             export_engine::kFP4GemmNamespace) != nullptr) {
        return 1;
    }
    return registry->registerCreator(creator, export_engine::kFP4GemmNamespace) ? 1 : 0;
}

namespace {
// Registration when the library is loaded (trtexec --staticPlugins=..., ctypes.CDLL).
struct RegisterAtLoad {
    RegisterAtLoad() { export_engine_register_fp4gemm(); }
} const gRegisterAtLoad;
}  // namespace
