"""Device (GPU / NPU) kernels of flashlite: optional, installed with `pip install 'flashlite[cuda]'`.

Nothing in the CPU path imports this package; importing its kernel module without torch and triton raises an
ImportError that names what to install. See docs/gpu.md.
"""
