// C API of the FP4Gemm kernels: layer checks, the dispatcher, workspace layout, and the launch
// sequence of every path. Host code only (the kernels live in the .cu files).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fp4gemm_common.cuh"

namespace fp4g {
namespace {

thread_local std::string g_last_error;

int fail(int status, const std::string& msg) {
    g_last_error = msg;
    return status;
}

constexpr int64_t kAlign = 256;
constexpr int64_t kDefaultSmallMMax = 64;

int64_t smallm_max_m() {
    static const int64_t v = [] {
        const char* env = std::getenv("FP4GEMM_SMALLM_MAX_M");
        if (env != nullptr && *env) {
            const long long x = std::atoll(env);
            if (x >= 0) return static_cast<int64_t>(x);
        }
        return kDefaultSmallMMax;
    }();
    return v;
}

bool has_wgmma() {
#ifdef FP4GEMM_HAS_SM90A
    return true;
#else
    return false;
#endif
}

// Value of code c of a minifloat (exporter.formats table formula), exact.
float act_code_value(const fp4gemm_layer_t& l, int c) {
    const int mask = (1 << l.a_mbits) - 1;
    const int e_field = c >> l.a_mbits, m_field = c & mask;
    if (e_field == 0) return static_cast<float>(m_field) * pow2(1 - l.a_bias - l.a_mbits);
    return static_cast<float>((1 << l.a_mbits) + m_field) * pow2(e_field - l.a_bias - l.a_mbits);
}

int act_grid_shift(const fp4gemm_layer_t& l) {
    ShiftRange r = shift_range_init();
    for (int c = 0; c <= l.a_max_code; ++c) r = shift_range_add(r, act_code_value(l, c));
    return shift_choose(r);
}

bool act_grid_f16_exact(const fp4gemm_layer_t& l) {
    for (int c = 0; c <= l.a_max_code; ++c)
        if (!exact_in_f16(act_code_value(l, c))) return false;
    return true;
}

int check_layer(const fp4gemm_layer_t* l) {
    if (l == nullptr) return fail(FP4GEMM_ERR_INVALID_LAYER, "layer is NULL");
    char buf[256];
    if (l->in_features < 1 || l->out_features < 1) {
        std::snprintf(buf, sizeof buf, "in_features=%d and out_features=%d must be >= 1",
                      l->in_features, l->out_features);
        return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
    }
    if (l->in_features > (1 << 24)) return fail(FP4GEMM_ERR_INVALID_LAYER, "in_features above 2^24");
    if (l->num_groups < 1 || l->num_groups > FP4GEMM_MAX_GROUPS) {
        std::snprintf(buf, sizeof buf, "num_groups=%d: between 1 and %d weight groups are supported",
                      l->num_groups, FP4GEMM_MAX_GROUPS);
        return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
    }
    int64_t rows = 0;
    for (int g = 0; g < l->num_groups; ++g) {
        if (l->group_bits[g] < 2 || l->group_bits[g] > 8) {
            std::snprintf(buf, sizeof buf, "group_bits[%d]=%d: code widths are 2..8 bits", g, l->group_bits[g]);
            return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
        }
        if (l->group_sizes[g] < 0) return fail(FP4GEMM_ERR_INVALID_LAYER, "negative group size");
        rows += l->group_sizes[g];
    }
    if (rows != l->out_features) {
        std::snprintf(buf, sizeof buf, "group_sizes sum to %lld, out_features is %d",
                      static_cast<long long>(rows), l->out_features);
        return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
    }
    if (l->a_mode != 0 && l->a_mode != 1) return fail(FP4GEMM_ERR_INVALID_LAYER, "a_mode must be 0 (static) or 1 (dynamic)");
    if (l->a_ebits != 0) {
        const int bits = (l->a_signed ? 1 : 0) + l->a_ebits + l->a_mbits;
        if (l->a_ebits < 1 || l->a_ebits > 6 || l->a_mbits < 0 || bits < 2 || bits > 8) {
            std::snprintf(buf, sizeof buf,
                          "activation format a_signed=%d a_ebits=%d a_mbits=%d: minifloats of 2..8 bits "
                          "with 1..6 exponent bits are supported", l->a_signed, l->a_ebits, l->a_mbits);
            return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
        }
        const int top = (1 << (l->a_ebits + l->a_mbits)) - 1;
        if (l->a_max_code < 1 || l->a_max_code > top) {
            std::snprintf(buf, sizeof buf, "a_max_code=%d outside [1, %d]", l->a_max_code, top);
            return fail(FP4GEMM_ERR_INVALID_LAYER, buf);
        }
        const int emin = 1 - l->a_bias, emax = (1 << l->a_ebits) - 1 - l->a_bias;
        if (emin - l->a_mbits < -120 || emax + l->a_mbits > 120) {
            return fail(FP4GEMM_ERR_INVALID_LAYER, "a_bias puts the activation grid outside float32's range");
        }
    }
    return FP4GEMM_OK;
}

LayerDesc make_desc(const fp4gemm_layer_t& l, int num_adapters) {
    LayerDesc d{};
    d.K = l.in_features;
    d.N = l.out_features;
    d.G = l.num_groups;
    int row = 0;
    int64_t byte = 0;
    for (int g = 0; g < l.num_groups; ++g) {
        d.bits[g] = l.group_bits[g];
        d.rows[g] = l.group_sizes[g];
        d.row0[g] = row;
        d.row_bytes[g] = static_cast<int32_t>((static_cast<int64_t>(l.in_features) * l.group_bits[g] + 7) / 8);
        d.byte0[g] = byte;
        row += l.group_sizes[g];
        byte += static_cast<int64_t>(l.group_sizes[g]) * d.row_bytes[g];
    }
    d.adapter_bytes = byte;
    d.num_adapters = num_adapters;
    d.act_quant = l.a_ebits > 0;
    d.dynamic = l.a_mode == 1;
    if (d.act_quant) {
        d.act = make_act_format(l.a_signed, l.a_ebits, l.a_mbits, l.a_bias, l.a_max_code);
        d.act_shift = act_grid_shift(l);
    } else {
        d.act = ActFormat{};
        d.act_shift = kNoShift;
    }
    return d;
}

int query_device(int32_t* sm, int32_t* sms) {
    int dev = 0, major = 0, minor = 0, count = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return fail(FP4GEMM_ERR_CUDA, std::string("querying the device: ") + cudaGetErrorString(e));
    *sm = major * 10 + minor;
    *sms = count;
    return FP4GEMM_OK;
}

int count_smallm_tiles(const fp4gemm_layer_t& l) {
    int n = 0;
    for (int g = 0; g < l.num_groups; ++g) n += (l.group_sizes[g] + 31) / 32;
    return n;
}

// Split-K of the SMALLM path for `chunks` 16-row chunks of activations.
int smallm_split(const fp4gemm_layer_t& l, int64_t chunks, int num_sms) {
    const int64_t base = std::max<int64_t>(1, count_smallm_tiles(l) * chunks);
    const int64_t kblocks = (l.in_features + 127) / 128;
    const int64_t want = (2 * static_cast<int64_t>(std::max(num_sms, 1)) + base - 1) / base;
    const int64_t cap = std::max<int64_t>(1, kblocks / 4);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, cap, 16})));
}

struct Layout {  // byte offsets inside the workspace
    int64_t flags, row_scale, row_zero, col_scale, col_bias, col_rowsum, a, b, partials, total;
};

int64_t piece(int64_t& at, int64_t bytes) {
    const int64_t off = at;
    at += round_up(std::max<int64_t>(bytes, 0), kAlign);
    return off;
}

bool uses_gemm(int path) { return path == FP4GEMM_PATH_MMA || path == FP4GEMM_PATH_WGMMA; }

// The run-time path for M rows (a plan chosen by the dispatcher hands small M to SMALLM).
int effective_path(const fp4gemm_plan_t& p, int64_t M) {
    if (!p.forced && uses_gemm(p.path) && M <= smallm_max_m()) return FP4GEMM_PATH_SMALLM;
    return p.path;
}

Layout layout_of(const fp4gemm_layer_t& l, const fp4gemm_plan_t& p) {
    const int64_t K_pad = round_up(l.in_features, kKPad);
    const int64_t N_pad = round_up(l.out_features, kTileN);
    const int64_t max_m = std::max<int64_t>(p.max_m, 1);
    const bool w4a16 = l.a_ebits == 0;
    const bool gemm = uses_gemm(p.path);
    const bool smallm = p.path == FP4GEMM_PATH_SMALLM || (gemm && !p.forced);
    const int64_t small_m = p.path == FP4GEMM_PATH_SMALLM ? max_m : std::min(max_m, smallm_max_m());

    int64_t a_bytes = 0;
    if (gemm && (!w4a16 || (static_cast<int64_t>(l.in_features) * 2) % 16 != 0)) a_bytes = max_m * K_pad * 2;
    if (smallm && !w4a16) a_bytes = std::max(a_bytes, small_m * K_pad * 2);
    int64_t part_bytes = 0;
    if (smallm) {
        const int64_t tiles = count_smallm_tiles(l);
        for (int64_t c = 1; c <= (small_m + 15) / 16; ++c) {
            const int s = smallm_split(l, c, p.num_sms);
            if (s > 1) part_bytes = std::max(part_bytes, tiles * c * s * 1024 * 4);
        }
    }
    Layout o{};
    int64_t at = 0;
    o.flags = piece(at, 16);
    o.row_scale = piece(at, max_m * 4);
    o.row_zero = piece(at, max_m * 4);
    o.col_scale = piece(at, gemm ? N_pad * 4 : 0);
    o.col_bias = piece(at, gemm ? N_pad * 4 : 0);
    o.col_rowsum = piece(at, gemm ? N_pad * 4 : 0);
    o.a = piece(at, a_bytes);
    o.b = piece(at, gemm ? N_pad * K_pad * 2 : 0);
    o.partials = piece(at, part_bytes);
    o.total = at;
    return o;
}

Workspace workspace_of(const Layout& o, void* base) {
    uint8_t* p = static_cast<uint8_t*>(base);
    Workspace w{};
    w.flags = reinterpret_cast<int32_t*>(p + o.flags);
    w.row_scale = reinterpret_cast<float*>(p + o.row_scale);
    w.row_zero = reinterpret_cast<float*>(p + o.row_zero);
    w.col_scale = reinterpret_cast<float*>(p + o.col_scale);
    w.col_bias = reinterpret_cast<float*>(p + o.col_bias);
    w.col_rowsum = reinterpret_cast<float*>(p + o.col_rowsum);
    w.a = p + o.a;
    w.b = p + o.b;
    w.partials = reinterpret_cast<float*>(p + o.partials);
    return w;
}

int cuda_fail(cudaError_t e, const char* what) {
    return fail(FP4GEMM_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(e));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int run_gemm_path(const LayerDesc& L, const Operands& op, const Workspace& ws, const Layout& o,
                  const fp4gemm_plan_t& p, int path, cudaStream_t stream) {
    const bool w4a16 = !L.act_quant;
    const int64_t K_pad = round_up(L.K, kKPad);
    const int N_pad = static_cast<int>(round_up(L.N, kTileN));
    const bool fp8 = !w4a16 && p.fp8;

    GemmArgs g{};
    g.M = op.M;
    g.N = L.N;
    g.N_pad = N_pad;
    g.b = ws.b;
    g.epi.col_scale = ws.col_scale;
    g.epi.col_bias = ws.col_bias;
    g.epi.col_rowsum = (L.act_quant && !L.act.is_signed) ? ws.col_rowsum : nullptr;
    g.epi.y = op.y;
    g.epi.dtype = op.dtype;
    g.epi.vec_ok = (static_cast<int64_t>(L.N) * dtype_bytes(op.dtype)) % 16 == 0 && aligned16(op.y);

    // one launch decodes the weights and quantizes (or copies) the activations
    PrepArgs prep{};
    prep.decode = 1;
    prep.col_block = path == FP4GEMM_PATH_WGMMA ? kWgmmaColBlock : kMmaColBlock;
    prep.kind16 = (w4a16 && op.dtype == FP4GEMM_BF16) ? kElemBF16 : kElemF16;
    prep.allow_fp8 = fp8 ? 1 : 0;
    prep.lda = K_pad;
    bool direct = false;
    if (w4a16) {
        // X itself is the A operand when TMA / cp.async can address its rows
        direct = (static_cast<int64_t>(L.K) * 2) % 16 == 0 && aligned16(op.x);
        if (!direct && o.b - o.a < op.M * K_pad * 2) return fail(FP4GEMM_ERR_WORKSPACE, "no room to copy X");
        prep.qmode = direct ? kQuantNone : kQuantCopy;
    } else {
        prep.qmode = fp8 ? kQuantAuto : kQuantF16;
    }
    cudaError_t e = launch_prep(L, op, ws, prep, stream);
    if (e != cudaSuccess) return cuda_fail(e, "prep launch");

    if (w4a16) {
        g.a = direct ? static_cast<const uint8_t*>(op.x) : ws.a;
        g.lda_bytes = direct ? static_cast<int64_t>(L.K) * 2 : K_pad * 2;
        g.a_valid_bytes = direct ? static_cast<int64_t>(L.K) * 2 : K_pad * 2;
        g.k_bytes = static_cast<int32_t>(K_pad * 2);
        g.ldb_bytes = K_pad * 2;
        g.kind = prep.kind16;
        g.flags = nullptr;
        e = path == FP4GEMM_PATH_WGMMA ? launch_gemm_wgmma(g, stream) : launch_gemm_mma(g, stream);
        return e == cudaSuccess ? FP4GEMM_OK : cuda_fail(e, "GEMM launch");
    }
    g.a = ws.a;
    g.epi.row_scale = ws.row_scale;
    g.epi.row_zero = ws.row_zero;
    const auto gemm = [&](int kind, const int32_t* flags, int run_if_fp8) {
        const int eb = elem_bytes(kind);
        g.kind = kind;
        g.lda_bytes = K_pad * eb;
        g.a_valid_bytes = K_pad * eb;
        g.ldb_bytes = K_pad * eb;
        g.k_bytes = static_cast<int32_t>(K_pad * eb);
        g.flags = flags;
        g.run_if_fp8 = run_if_fp8;
        return path == FP4GEMM_PATH_WGMMA ? launch_gemm_wgmma(g, stream) : launch_gemm_mma(g, stream);
    };
    if (fp8) {  // both launched; the one the flags word does not name returns at once
        e = gemm(kElemE4M3, ws.flags, 1);
        if (e == cudaSuccess) e = gemm(kElemF16, ws.flags, 0);
    } else {
        e = gemm(kElemF16, nullptr, 0);
    }
    return e == cudaSuccess ? FP4GEMM_OK : cuda_fail(e, "GEMM launch");
}

}  // namespace
}  // namespace fp4g

using namespace fp4g;

extern "C" {

FP4GEMM_API int fp4gemm_check_layer(const fp4gemm_layer_t* layer) { return check_layer(layer); }

FP4GEMM_API int64_t fp4gemm_adapter_bytes(const fp4gemm_layer_t* layer) {
    if (check_layer(layer) != FP4GEMM_OK) return -1;
    return make_desc(*layer, 1).adapter_bytes;
}

FP4GEMM_API int64_t fp4gemm_smallm_max_m(void) { return smallm_max_m(); }

FP4GEMM_API int32_t fp4gemm_has_wgmma(void) { return has_wgmma() ? 1 : 0; }

FP4GEMM_API int fp4gemm_make_plan(const fp4gemm_layer_t* layer, int64_t max_m, int32_t dtype,
                                  int32_t force_path, int32_t sm_version, int32_t num_sms,
                                  fp4gemm_plan_t* plan) {
    if (plan == nullptr) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "plan is NULL");
    const int st = check_layer(layer);
    if (st != FP4GEMM_OK) return st;
    if (dtype < FP4GEMM_F32 || dtype > FP4GEMM_BF16) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    if (max_m < 0) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "max_m must be >= 0");
    if (sm_version == 0) {
        const int q = query_device(&sm_version, &num_sms);
        if (q != FP4GEMM_OK) return q;
    }
    const fp4gemm_layer_t& l = *layer;
    const bool w4a16 = l.a_ebits == 0;
    const bool act_f16 = w4a16 || act_grid_f16_exact(l);
    const bool act_e4m3 = !w4a16 && act_grid_shift(l) != kNoShift;
    const bool tc = sm_version >= 80;
    // Tensor-core paths need 16-bit operands: X itself (W4A16 fp16/bf16) or grid values exact in fp16.
    const bool tc_ok = tc && (w4a16 ? dtype != FP4GEMM_F32 : act_f16);
    const bool wgmma_ok = tc_ok && sm_version == 90 && has_wgmma();

    fp4gemm_plan_t p{};
    p.sm_version = sm_version;
    p.num_sms = std::max(num_sms, 1);
    p.max_m = max_m;
    p.forced = force_path != FP4GEMM_PATH_AUTO;
    if (force_path == FP4GEMM_PATH_AUTO) {
        if (!tc_ok) p.path = FP4GEMM_PATH_SIMT;
        else if (max_m <= smallm_max_m()) p.path = FP4GEMM_PATH_SMALLM;
        else if (wgmma_ok) p.path = FP4GEMM_PATH_WGMMA;
        else p.path = FP4GEMM_PATH_MMA;
    } else {
        p.path = force_path;
        const char* why = nullptr;
        switch (force_path) {
            case FP4GEMM_PATH_SIMT: break;
            case FP4GEMM_PATH_SMALLM:
            case FP4GEMM_PATH_MMA:
                if (!tc_ok) why = "needs sm_80+ and 16-bit operands (fp16/bf16 X for W4A16; an activation grid exact in fp16)";
                break;
            case FP4GEMM_PATH_WGMMA:
                if (!wgmma_ok) why = "needs an sm_90 device, a library built for sm_90a, and 16-bit operands";
                break;
            default: why = "unknown path";
        }
        if (why != nullptr) return fail(FP4GEMM_ERR_UNSUPPORTED, std::string("path ") + fp4gemm_path_name(force_path) + " " + why);
    }
    p.fp8 = uses_gemm(p.path) && !w4a16 && act_e4m3 && sm_version >= 89;
    p.split_k = p.path == FP4GEMM_PATH_SMALLM || (uses_gemm(p.path) && !p.forced) ? smallm_split(l, 1, p.num_sms) : 1;
    *plan = p;
    return FP4GEMM_OK;
}

FP4GEMM_API size_t fp4gemm_workspace_size(const fp4gemm_layer_t* layer, const fp4gemm_plan_t* plan) {
    if (check_layer(layer) != FP4GEMM_OK || plan == nullptr) return 0;
    return static_cast<size_t>(layout_of(*layer, *plan).total);
}

FP4GEMM_API size_t fp4gemm_semaphore_count(const fp4gemm_layer_t* layer, const fp4gemm_plan_t* plan) {
    if (check_layer(layer) != FP4GEMM_OK || plan == nullptr) return 0;
    const bool smallm = plan->path == FP4GEMM_PATH_SMALLM || (uses_gemm(plan->path) && !plan->forced);
    if (!smallm) return 0;
    const int64_t m = plan->path == FP4GEMM_PATH_SMALLM ? plan->max_m : std::min(plan->max_m, smallm_max_m());
    return static_cast<size_t>(count_smallm_tiles(*layer) * std::max<int64_t>(1, (m + 15) / 16));
}

FP4GEMM_API const int32_t* fp4gemm_flags_address(const fp4gemm_layer_t* layer, const fp4gemm_plan_t* plan,
                                                 const void* workspace) {
    if (check_layer(layer) != FP4GEMM_OK || plan == nullptr || workspace == nullptr) return nullptr;
    if (!uses_gemm(plan->path)) return nullptr;
    const Layout o = layout_of(*layer, *plan);
    return reinterpret_cast<const int32_t*>(static_cast<const uint8_t*>(workspace) + o.flags);
}

FP4GEMM_API int fp4gemm_run(const fp4gemm_layer_t* layer, const fp4gemm_problem_t* pr, const fp4gemm_plan_t* plan,
                            void* workspace, size_t workspace_bytes, int32_t* semaphores, cudaStream_t stream) {
    const int st = check_layer(layer);
    if (st != FP4GEMM_OK) return st;
    if (pr == nullptr || plan == nullptr) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "problem or plan is NULL");
    if (pr->M < 0 || pr->M > plan->max_m) {
        return fail(FP4GEMM_ERR_INVALID_PROBLEM, "M=" + std::to_string(pr->M) + " outside the plan's [0, " +
                                                     std::to_string(plan->max_m) + "]");
    }
    if (pr->dtype < FP4GEMM_F32 || pr->dtype > FP4GEMM_BF16) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "bad dtype");
    if (pr->num_adapters < 1) return fail(FP4GEMM_ERR_INVALID_PROBLEM, "num_adapters must be >= 1");
    if (pr->M == 0) return FP4GEMM_OK;
    if (!pr->x || !pr->w || !pr->w_scale || !pr->w_lut || !pr->a_scale || !pr->a_zero || !pr->bias || !pr->perm ||
        !pr->adapter || !pr->y) {
        return fail(FP4GEMM_ERR_INVALID_PROBLEM, "a device pointer of the problem is NULL");
    }
    const Layout o = layout_of(*layer, *plan);
    if (workspace_bytes < static_cast<size_t>(o.total) || (o.total > 0 && workspace == nullptr)) {
        return fail(FP4GEMM_ERR_WORKSPACE, "workspace of " + std::to_string(workspace_bytes) + " bytes, need " +
                                               std::to_string(o.total));
    }
    if (o.total > 0 && (reinterpret_cast<uintptr_t>(workspace) & (kAlign - 1)) != 0) {
        return fail(FP4GEMM_ERR_WORKSPACE, "workspace must be 256-byte aligned");
    }

    const LayerDesc L = make_desc(*layer, pr->num_adapters);
    Operands op{};
    op.x = pr->x;
    op.w = static_cast<const uint8_t*>(pr->w);
    op.w_scale = pr->w_scale;
    op.w_lut = pr->w_lut;
    op.a_scale = pr->a_scale;
    op.a_zero = pr->a_zero;
    op.bias = pr->bias;
    op.perm = pr->perm;
    op.adapter = pr->adapter;
    op.adapter_is_int32 = pr->adapter_is_int32;
    op.dtype = pr->dtype;
    op.y = pr->y;
    op.M = pr->M;
    const Workspace ws = workspace_of(o, workspace);

    int path = effective_path(*plan, pr->M);
    if (path == FP4GEMM_PATH_SMALLM && !L.act_quant && pr->dtype == FP4GEMM_F32) path = FP4GEMM_PATH_SIMT;
    if (uses_gemm(path) && !L.act_quant) {
        // W4A16 reads X in place when TMA/cp.async can address it, else copies it into the workspace
        const bool direct = (static_cast<int64_t>(L.K) * 2) % 16 == 0 && aligned16(pr->x);
        const bool room = o.b - o.a >= pr->M * round_up(L.K, kKPad) * 2;
        if (pr->dtype == FP4GEMM_F32 || (!direct && !room)) path = FP4GEMM_PATH_SIMT;
    }
    cudaError_t e = cudaSuccess;
    switch (path) {
        case FP4GEMM_PATH_SIMT:
            if (L.act_quant && L.dynamic) {
                e = launch_quantize_rows(L, op, ws, kQuantStats, 0, stream);
                if (e != cudaSuccess) return cuda_fail(e, "quantize_rows launch");
            }
            e = launch_simt(L, op, ws, stream);
            return e == cudaSuccess ? FP4GEMM_OK : cuda_fail(e, "simt launch");
        case FP4GEMM_PATH_SMALLM: {
            SmallMArgs sa{};
            if (L.act_quant) {  // fp16 grid values and row scales first (static or per token)
                const int64_t K_pad = round_up(L.K, kKPad);
                e = launch_quantize_rows(L, op, ws, kQuantF16, K_pad, stream);
                if (e != cudaSuccess) return cuda_fail(e, "quantize_rows launch");
                sa = SmallMArgs{ws.a, K_pad, kElemF16, 1, ws.row_scale, ws.row_zero};
            } else {
                const int vec = (static_cast<int64_t>(L.K) * 2) % 16 == 0 && aligned16(op.x);
                sa = SmallMArgs{op.x, L.K, op.dtype == FP4GEMM_BF16 ? kElemBF16 : kElemF16, vec, nullptr, nullptr};
            }
            const int split = std::min(plan->split_k, smallm_split(*layer, (pr->M + 15) / 16, plan->num_sms));
            e = launch_smallm(L, op, sa, ws, semaphores != nullptr ? std::max(split, 1) : 1, semaphores, stream);
            return e == cudaSuccess ? FP4GEMM_OK : cuda_fail(e, "smallm launch");
        }
        case FP4GEMM_PATH_MMA:
        case FP4GEMM_PATH_WGMMA:
            return run_gemm_path(L, op, ws, o, *plan, path, stream);
        default:
            return fail(FP4GEMM_ERR_INVALID_PROBLEM, "plan holds an unknown path");
    }
}

FP4GEMM_API const char* fp4gemm_status_string(int status) {
    switch (status) {
        case FP4GEMM_OK: return "ok";
        case FP4GEMM_ERR_INVALID_LAYER: return "invalid layer";
        case FP4GEMM_ERR_INVALID_PROBLEM: return "invalid problem";
        case FP4GEMM_ERR_WORKSPACE: return "workspace too small or misaligned";
        case FP4GEMM_ERR_UNSUPPORTED: return "unsupported on this device or build";
        case FP4GEMM_ERR_CUDA: return "CUDA error";
        default: return "unknown status";
    }
}

FP4GEMM_API const char* fp4gemm_last_error_message(void) { return g_last_error.c_str(); }

FP4GEMM_API const char* fp4gemm_path_name(int path) {
    switch (path) {
        case FP4GEMM_PATH_AUTO: return "auto";
        case FP4GEMM_PATH_SIMT: return "simt";
        case FP4GEMM_PATH_SMALLM: return "smallm";
        case FP4GEMM_PATH_MMA: return "mma";
        case FP4GEMM_PATH_WGMMA: return "wgmma";
        default: return "unknown";
    }
}

}  // extern "C"
