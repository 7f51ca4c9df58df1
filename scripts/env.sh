# Sourced by the Makefile and the scripts: where the torch virtualenv lives and
# how cargo and the binaries find libtorch. Safe to source more than once.
NT_TORCH_VERSION=2.11.0
export NT_TORCH_VENV="${NT_TORCH_VENV:-$HOME/.cache/nt/torch-$NT_TORCH_VERSION}"
export LIBTORCH_USE_PYTORCH=1
case ":$PATH:" in
  *":$NT_TORCH_VENV/bin:"*) ;;
  *) export PATH="$NT_TORCH_VENV/bin:$PATH" ;;
esac
NT_TORCH_LIB="$NT_TORCH_VENV/lib/python3.11/site-packages/torch/lib"
if [ -d "$NT_TORCH_VENV/lib" ]; then
  NT_TORCH_LIB="$(ls -d "$NT_TORCH_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n 1)"
fi
export NT_TORCH_LIB
case ":${LD_LIBRARY_PATH:-}:" in
  *":$NT_TORCH_LIB:"*) ;;
  *) export LD_LIBRARY_PATH="$NT_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
export NT_FASHION_MNIST="${NT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
