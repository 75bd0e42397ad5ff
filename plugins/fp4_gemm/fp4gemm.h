/* FP4Gemm CUDA kernels: plain C entry points (no TensorRT needed).
 *
 * Y = A(X) * W^T + bias, with the output columns permuted, as defined in
 * docs/fp4gemm_contract.md: X [M, K] (fp32/fp16/bf16), W packed minifloat codes in grouped row
 * order (mixed precision), per-row weight scales, a decode table per group, activations quantized
 * on the fly (signed, or unsigned with a zero point; a static per-tensor or dynamic per-token
 * scale), or not at all (W4A16).
 *
 * Typical use:
 *     fp4gemm_layer_t layer = {...};                 // from the node's attributes
 *     fp4gemm_plan_t plan;
 *     fp4gemm_make_plan(&layer, M, FP4GEMM_F16, FP4GEMM_PATH_AUTO, device, &plan);
 *     size_t bytes = fp4gemm_workspace_size(&layer, &plan);
 *     fp4gemm_run(&layer, &problem, &plan, workspace, bytes, semaphores, stream);
 *
 * Every function returns FP4GEMM_OK (0) or an error code; fp4gemm_status_string() names it and
 * fp4gemm_last_error_message() has the detail of the last failure on the calling thread.
 * Nothing here synchronizes the stream.
 */
#ifndef EXPORT_ENGINE_FP4GEMM_H
#define EXPORT_ENGINE_FP4GEMM_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FP4GEMM_API __declspec(dllexport)
#else
#define FP4GEMM_API __attribute__((visibility("default")))
#endif

#define FP4GEMM_VERSION 1
#define FP4GEMM_MAX_GROUPS 16

typedef enum {
    FP4GEMM_OK = 0,
    FP4GEMM_ERR_INVALID_LAYER = 1,    /* attributes inconsistent or unsupported */
    FP4GEMM_ERR_INVALID_PROBLEM = 2,  /* null pointer, bad M, dtype, alignment */
    FP4GEMM_ERR_WORKSPACE = 3,        /* workspace too small */
    FP4GEMM_ERR_UNSUPPORTED = 4,      /* forced path not available on this device or build */
    FP4GEMM_ERR_CUDA = 5              /* a CUDA call or launch failed */
} fp4gemm_status_t;

typedef enum { FP4GEMM_F32 = 0, FP4GEMM_F16 = 1, FP4GEMM_BF16 = 2 } fp4gemm_dtype_t;

/* Kernel families. AUTO lets the dispatcher choose (see docs/plugin.md, "Dispatch"). */
typedef enum {
    FP4GEMM_PATH_AUTO = 0,
    FP4GEMM_PATH_SIMT = 1,    /* fp32 CUDA cores: any input, any format; the exact fallback */
    FP4GEMM_PATH_SMALLM = 2,  /* small M: packed weights decoded in registers, m16n8k16 MMA */
    FP4GEMM_PATH_MMA = 3,     /* decode + quantize passes, mma.sync GEMM (fp16/bf16; e4m3 on sm_89+) */
    FP4GEMM_PATH_WGMMA = 4    /* decode + quantize passes, sm_90a wgmma GEMM with TMA loads */
} fp4gemm_path_t;

/* The static description of one layer: the FP4Gemm node's attributes. */
typedef struct {
    int32_t in_features;  /* K */
    int32_t out_features; /* N */
    int32_t num_groups;   /* G: entries used in group_bits / group_sizes */
    int32_t group_bits[FP4GEMM_MAX_GROUPS];  /* 2..8 */
    int32_t group_sizes[FP4GEMM_MAX_GROUPS]; /* rows per group; sum = N */
    int32_t a_signed, a_ebits, a_mbits, a_bias, a_max_code; /* a_ebits = 0: W4A16 */
    int32_t a_mode;       /* 0 static per-tensor scale, 1 dynamic per token */
} fp4gemm_layer_t;

/* One call: device pointers, laid out as the contract's nine inputs and one output. */
typedef struct {
    int64_t M;            /* rows of X (all leading dimensions flattened); 0 is allowed */
    int32_t dtype;        /* fp4gemm_dtype_t of X and Y */
    int32_t num_adapters; /* A: W is [A, B] */
    const void* x;        /* [M, K] */
    const void* w;        /* [A, B] int8 (bytes of the packed codes) */
    const float* w_scale; /* [N] */
    const float* w_lut;   /* [G, 256] */
    const float* a_scale; /* [] */
    const float* a_zero;  /* [] */
    const float* bias;    /* [N] */
    const int32_t* perm;  /* [N] */
    const void* adapter;  /* [] int64 (or int32 when adapter_is_int32) */
    int32_t adapter_is_int32;
    void* y;              /* [M, N] */
} fp4gemm_problem_t;

/* What the dispatcher decided for one (layer, M, dtype, device). Plain data: a caller may also
 * fill it by hand (tests force every path). */
typedef struct {
    int32_t path;         /* fp4gemm_path_t, never AUTO after fp4gemm_make_plan */
    int32_t fp8;          /* MMA/WGMMA: 1 = E4M3 tensor cores (W4A4 when the grids fit E4M3) */
    int32_t split_k;      /* SMALLM: K slices reduced across CTAs (1 = none) */
    int32_t sm_version;   /* compute capability * 10 of the device planned for */
    int32_t num_sms;
    int64_t max_m;        /* workspace is sized for M <= max_m */
    int32_t forced;       /* 0: fp4gemm_run may switch MMA/WGMMA to SMALLM for small M */
} fp4gemm_plan_t;

/* Checks the attributes; on failure a message is available from fp4gemm_last_error_message(). */
FP4GEMM_API int fp4gemm_check_layer(const fp4gemm_layer_t* layer);

/* Bytes of one adapter's packed weights (the contract's B). */
FP4GEMM_API int64_t fp4gemm_adapter_bytes(const fp4gemm_layer_t* layer);

/* Chooses the kernel path for up to max_m rows. sm_version/num_sms describe the device (pass 0
 * for both to query the current device). force_path != AUTO pins the path (checked against the
 * device and the build). Pure host code: no CUDA call unless the device must be queried. */
FP4GEMM_API int fp4gemm_make_plan(const fp4gemm_layer_t* layer, int64_t max_m, int32_t dtype,
                                  int32_t force_path, int32_t sm_version, int32_t num_sms,
                                  fp4gemm_plan_t* plan);

/* Workspace bytes a plan needs for M <= plan->max_m (256-byte aligned pieces inside). */
FP4GEMM_API size_t fp4gemm_workspace_size(const fp4gemm_layer_t* layer, const fp4gemm_plan_t* plan);

/* Number of int32 semaphores the SMALLM split-K reduction may use. The caller allocates them
 * once, zeroed, and keeps them for later calls (each call leaves them zero again). Pass NULL to
 * run without cross-CTA split-K. */
FP4GEMM_API size_t fp4gemm_semaphore_count(const fp4gemm_layer_t* layer, const fp4gemm_plan_t* plan);

/* Enqueues the computation on `stream`. problem->M may be smaller than plan->max_m; the path may
 * then switch to one the plan's workspace also covers. */
FP4GEMM_API int fp4gemm_run(const fp4gemm_layer_t* layer, const fp4gemm_problem_t* problem,
                            const fp4gemm_plan_t* plan, void* workspace, size_t workspace_bytes,
                            int32_t* semaphores, cudaStream_t stream);

/* Diagnostics word the decode pass of the MMA/WGMMA paths leaves in the workspace (bit 0: the
 * weight tables fit E4M3 and the FP8 GEMM ran; bit 1: a table value is not exact in the 16-bit
 * operand type; bit 2: an adapter index was out of range; bit 3: perm held an invalid index).
 * Returns its device address inside `workspace` (NULL for other paths). */
FP4GEMM_API const int32_t* fp4gemm_flags_address(const fp4gemm_layer_t* layer,
                                                 const fp4gemm_plan_t* plan, const void* workspace);

FP4GEMM_API const char* fp4gemm_status_string(int status);
FP4GEMM_API const char* fp4gemm_last_error_message(void);
FP4GEMM_API const char* fp4gemm_path_name(int path);

/* Largest M the dispatcher sends to the SMALLM path (FP4GEMM_SMALLM_MAX_M in the environment
 * overrides it, for tuning). */
FP4GEMM_API int64_t fp4gemm_smallm_max_m(void);

/* 1 when the library holds the sm_90a (wgmma) kernels, else 0. */
FP4GEMM_API int32_t fp4gemm_has_wgmma(void);

#ifdef __cplusplus
}
#endif

#endif /* EXPORT_ENGINE_FP4GEMM_H */
