// CPU self-test of the FP4Gemm TensorRT plugin's host logic, built against TensorRT's headers
// alone: getLogger()/getPluginRegistry() are stubbed here, and the kernels are the dispatcher
// build (fp4gemm_api.cpp + fp4gemm_launch_stubs.cpp). tests/test_fp4gemm_plugin.py builds and
// runs it. Prints "fields: <names>" and "OK" on success; exits non-zero on the first failure.
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fp4gemm_plugin.h"

using namespace nvinfer1;
using export_engine::FP4GemmPlugin;
using export_engine::FP4GemmPluginCreator;

namespace {

struct CapturingLogger : ILogger {
    std::string last;
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        if (severity <= Severity::kWARNING) last = msg;
    }
} gLogger;

int gFailures = 0;
#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::fprintf(stderr, "FAILED %s:%d: %s (last log: %s)\n", __FILE__, __LINE__, #cond, \
                         gLogger.last.c_str());                                      \
            ++gFailures;                                                             \
        }                                                                            \
    } while (0)

// Fields as the ONNX parser passes a node's attributes (ints as INT32, strings as CHAR).
struct Attrs {
    std::vector<int32_t> scalars{1280, 640, 1, 2, 1, 1, 7, 0};  // K, N, a_signed, a_ebits, a_mbits, a_bias, a_max_code, a_mode
    std::vector<int32_t> bits{3, 4, 5}, sizes{64, 512, 64};
    std::string ns{"export_engine"}, ver{"1"};
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};
    PluginFieldCollection const* make(std::vector<std::string> const& drop = {}) {
        static char const* names[] = {"in_features", "out_features", "a_signed", "a_ebits", "a_mbits", "a_bias", "a_max_code", "a_mode"};
        fields.clear();
        auto dropped = [&](char const* n) {
            for (auto const& d : drop)
                if (d == n) return true;
            return false;
        };
        for (int i = 0; i < 8; ++i)
            if (!dropped(names[i])) fields.emplace_back(names[i], &scalars[i], PluginFieldType::kINT32, 1);
        if (!dropped("group_bits")) fields.emplace_back("group_bits", bits.data(), PluginFieldType::kINT32, static_cast<int32_t>(bits.size()));
        if (!dropped("group_sizes")) fields.emplace_back("group_sizes", sizes.data(), PluginFieldType::kINT32, static_cast<int32_t>(sizes.size()));
        fields.emplace_back("plugin_namespace", ns.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(ns.size()));
        fields.emplace_back("plugin_version", ver.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(ver.size()));
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

FP4GemmPlugin* asPlugin(IPluginV3* p) {
    return static_cast<FP4GemmPlugin*>(static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)));
}

Dims dims(std::vector<int64_t> const& d) {
    Dims r{};
    r.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) r.d[i] = d[i];
    return r;
}

std::vector<DynamicPluginTensorDesc> descs(DataType x, int64_t K, int64_t N, int64_t B, int64_t G, int64_t maxM) {
    std::vector<DynamicPluginTensorDesc> d(10);
    auto set = [&](int i, DataType t, std::vector<int64_t> const& shape) {
        d[i].desc.type = t;
        d[i].desc.format = TensorFormat::kLINEAR;
        d[i].desc.dims = dims(shape);
        d[i].min = d[i].opt = d[i].max = dims(shape);
    };
    set(0, x, {-1, K});
    d[0].min = dims({1, K});
    d[0].opt = dims({maxM / 2 + 1, K});
    d[0].max = dims({maxM, K});
    set(1, DataType::kINT8, {2, B});
    set(2, DataType::kFLOAT, {N});
    set(3, DataType::kFLOAT, {G, 256});
    set(4, DataType::kFLOAT, {});
    set(5, DataType::kFLOAT, {});
    set(6, DataType::kFLOAT, {N});
    set(7, DataType::kINT32, {N});
    set(8, DataType::kINT64, {});
    set(9, x, {-1, N});
    return d;
}

}  // namespace

extern "C" ILogger* getLogger() noexcept { return &gLogger; }
extern "C" IPluginRegistry* getPluginRegistry() noexcept { return nullptr; }

int main() {
    FP4GemmPluginCreator creator;
    CHECK(std::string(creator.getPluginName()) == "FP4Gemm");
    CHECK(std::string(creator.getPluginVersion()) == "1");
    CHECK(std::string(creator.getPluginNamespace()) == "export_engine");
    PluginFieldCollection const* names = creator.getFieldNames();
    std::printf("fields:");
    for (int i = 0; i < names->nbFields; ++i) std::printf(" %s", names->fields[i].name);
    std::printf("\n");

    // creation from node attributes, and the serialization round trip
    Attrs attrs;
    std::unique_ptr<IPluginV3> built(creator.createPlugin("layer", attrs.make(), TensorRTPhase::kBUILD));
    CHECK(built != nullptr);
    if (!built) return 1;
    FP4GemmPlugin* p = asPlugin(built.get());
    CHECK(p->getCapabilityInterface(PluginCapabilityType::kBUILD) != nullptr);
    CHECK(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME) != nullptr);
    fp4gemm_layer_t const want = p->layer();
    CHECK(want.in_features == 1280 && want.out_features == 640 && want.num_groups == 3);
    CHECK(want.group_bits[2] == 5 && want.group_sizes[1] == 512 && want.a_max_code == 7);
    std::unique_ptr<IPluginV3> restored(creator.createPlugin("layer", p->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    CHECK(restored != nullptr);
    if (restored) CHECK(std::memcmp(&asPlugin(restored.get())->layer(), &want, sizeof want) == 0);
    std::unique_ptr<IPluginV3> cloned(built->clone());
    CHECK(cloned != nullptr && std::memcmp(&asPlugin(cloned.get())->layer(), &want, sizeof want) == 0);

    // INT64-typed integer fields (other exporters) are accepted too
    {
        std::vector<int64_t> k64{1280};
        Attrs a2;
        PluginFieldCollection const* fc = a2.make({"in_features"});
        std::vector<PluginField> f(fc->fields, fc->fields + fc->nbFields);
        f.emplace_back("in_features", k64.data(), PluginFieldType::kINT64, 1);
        PluginFieldCollection fc2{static_cast<int32_t>(f.size()), f.data()};
        std::unique_ptr<IPluginV3> q(creator.createPlugin("l64", &fc2, TensorRTPhase::kBUILD));
        CHECK(q != nullptr && asPlugin(q.get())->layer().in_features == 1280);
    }

    // invalid attributes: no plugin, a message naming the problem
    {
        Attrs bad;
        gLogger.last.clear();
        CHECK(creator.createPlugin("bad", bad.make({"in_features"}), TensorRTPhase::kBUILD) == nullptr);
        CHECK(gLogger.last.find("in_features") != std::string::npos);
        bad.sizes = {64, 500, 64};
        CHECK(creator.createPlugin("bad", bad.make(), TensorRTPhase::kBUILD) == nullptr);
        CHECK(gLogger.last.find("sum to") != std::string::npos);
        Attrs bad2;
        bad2.bits = {4, 4};
        CHECK(creator.createPlugin("bad", bad2.make(), TensorRTPhase::kBUILD) == nullptr);
        CHECK(gLogger.last.find("length") != std::string::npos);
    }

    // formats and types
    int64_t const K = 1280, N = 640, G = 3;
    int64_t const B = fp4gemm_adapter_bytes(&want);
    CHECK(B == 64 * 480 + 512 * 640 + 64 * 800);
    auto ok = [&](DataType x, int pos, DataType t) {
        auto d = descs(x, K, N, B, G, 8192);
        d[static_cast<size_t>(pos)].desc.type = t;
        return p->supportsFormatCombination(pos, d.data(), 9, 1);
    };
    for (DataType x : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
        CHECK(ok(x, 0, x));
        CHECK(ok(x, 9, x));
        CHECK(ok(x, 1, DataType::kINT8));
        CHECK(!ok(x, 1, DataType::kUINT8));
        CHECK(ok(x, 3, DataType::kFLOAT));
        CHECK(!ok(x, 3, DataType::kHALF));
        CHECK(ok(x, 7, DataType::kINT32));
        CHECK(!ok(x, 7, DataType::kINT64));
        CHECK(ok(x, 8, DataType::kINT64));
        CHECK(ok(x, 8, DataType::kINT32));
    }
    CHECK(!ok(DataType::kHALF, 9, DataType::kFLOAT));  // Y has X's type
    CHECK(!ok(DataType::kINT8, 0, DataType::kINT8));
    {
        auto d = descs(DataType::kHALF, K, N, B, G, 8192);
        d[0].desc.format = TensorFormat::kHWC8;
        CHECK(!p->supportsFormatCombination(0, d.data(), 9, 1));
    }
    DataType in[9], out[1];
    for (auto& t : in) t = DataType::kFLOAT;
    in[0] = DataType::kBF16;
    CHECK(p->getOutputDataTypes(out, 1, in, 9) == 0 && out[0] == DataType::kBF16);
    CHECK(p->getOutputDataTypes(out, 1, in, 8) != 0);

    // shapes
    {
        auto d = descs(DataType::kHALF, K, N, B, G, 8192);
        CHECK(p->configurePlugin(d.data(), 9, d.data() + 9, 1) == 0);
        auto wrongK = descs(DataType::kHALF, K + 1, N, B, G, 8192);
        CHECK(p->configurePlugin(wrongK.data(), 9, wrongK.data() + 9, 1) != 0);
        CHECK(gLogger.last.find("in_features") != std::string::npos);
        auto wrongB = descs(DataType::kHALF, K, N, B + 1, G, 8192);
        CHECK(p->configurePlugin(wrongB.data(), 9, wrongB.data() + 9, 1) != 0);
        CHECK(gLogger.last.find("INT8 packed codes") != std::string::npos);
        auto wrongLut = descs(DataType::kHALF, K, N, B, G + 1, 8192);
        CHECK(p->configurePlugin(wrongLut.data(), 9, wrongLut.data() + 9, 1) != 0);
        auto small = descs(DataType::kHALF, K, N, B, G, 16);
        size_t const ws_big = p->getWorkspaceSize(d.data(), 9, d.data() + 9, 1);
        size_t const ws_small = p->getWorkspaceSize(small.data(), 9, small.data() + 9, 1);
        CHECK(ws_small > 0 && ws_big > ws_small);
        CHECK(ws_big >= static_cast<size_t>(8192 * 1280 * 2 + 640 * 1280 * 2));
    }

    // runtime pieces that need no GPU: a context clone; enqueue without a device fails cleanly
    std::unique_ptr<IPluginV3> attached(p->attachToContext(nullptr));
    CHECK(attached != nullptr);
    {
        PluginTensorDesc id[9]{}, od[1]{};
        auto d = descs(DataType::kHALF, K, N, B, G, 8192);
        for (int i = 0; i < 9; ++i) id[i] = d[static_cast<size_t>(i)].desc;
        id[0].dims = dims({4, K});
        od[0] = d[9].desc;
        od[0].dims = dims({4, N});
        CHECK(p->onShapeChange(id, 9, od, 1) == 0);
        id[0].dims = dims({4, K - 1});
        CHECK(p->onShapeChange(id, 9, od, 1) != 0);
        int dev_count = 0;
        if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
            cudaGetLastError();
            id[0].dims = dims({4, K});
            void const* inputs[9] = {};
            void* outputs[1] = {};
            CHECK(asPlugin(attached.get())->enqueue(id, od, inputs, outputs, nullptr, nullptr) != 0);
        }
    }
    if (gFailures == 0) std::printf("OK\n");
    return gFailures == 0 ? 0 : 1;
}
