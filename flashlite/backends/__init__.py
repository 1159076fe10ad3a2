"""The seam between the DeepSeek V4 model definition (flashlite/models/deepseek_v4.py) and the hardware.

The model is written once, in terms of these named operations; a backend implements them for its device:

    matmul_batch   y = x W^T for several (weight, activation) pairs, any block format
    rms_norm       x * rsqrt(mean(x^2) + eps) * weight
    rope           interleaved rotation of the last rope dims by given cos/sin, in place
    hc_pre         hyper-connection collapse: mixing matmul, sigmoids, Sinkhorn, weighted sum of the streams
    hc_post        hyper-connection expansion of a sublayer's output back into the streams
    compress_pool  the compressor's per-channel softmax pooling of closed windows
    indexer_topk   the lightning indexer's scores of compressed rows and their top-k
    attention_sink sparse attention over window rows and picked compressed rows, with a per-head sink
    moe_route      the router: sqrt-softplus scores, hash or biased top-k, renormalised weights
    moe_experts    routed expert dispatch (SwiGLU with clamps), from memory or from the expert cache
    plan_ffn / ffn_step   a decode step's MoE sublayer with its hyper-connection, planned at load, run in one call

`cpu` (numpy and the C core) is the only backend today; a GPU backend provides the same names.
"""
