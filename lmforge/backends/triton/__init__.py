"""The Triton backend: kernel templates, their launchers, ahead-of-time builds and the artifact's kernels."""
import os

# Triton 3.9 warns on every build that its default (FP fusion on: a*b+c as one FMA) changes in 3.10. lmforge's
# kernels, their tests and their measured figures use fusion on, Triton 3.6's default too: keep it explicitly,
# unless the user chose otherwise.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
