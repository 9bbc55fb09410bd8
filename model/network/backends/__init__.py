"""Backend-specific implementations of the network's operations, behind one interface each.

`cpu_kernels`: XLA custom calls for serving on one CPU device (Dense products, attention over the KV
cache, dense and paged); `cpu_kernels.enabled(mesh)` is the one place that decides whether they run.
`tpu_paged`: JAX's ragged paged attention Pallas kernel over the serving block pool on TPU (and in
interpret mode on CPU, for tests). The XLA
reference paths (model/network/dense.py, attention.py, kv_cache.py) are the fallback everywhere and
the oracle in tests.
"""
