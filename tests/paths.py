"""Where the test data lives: a copy of ../shared/golden (made with ModelOpt 0.47.0) is kept in
tests/golden so a clean clone runs the suite on its own."""
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
VECTORS_NPZ = GOLDEN_DIR / "nvfp4_vectors.npz"
TINY_LLAMA = GOLDEN_DIR / "tiny_llama"
