#!/usr/bin/env bash
# Installs NumPy 2.2.6 for python3 (the C ABI's ctypes tests in capi/tests/python need it).
# Idempotent: does nothing when python3 already imports NumPy. Debian's system Python is
# "externally managed" (PEP 668), hence the fallback with --break-system-packages.
set -euo pipefail
py="${PYTHON:-python3}"
if "$py" -c 'import numpy' 2>/dev/null; then
  echo "setup-numpy: $("$py" -c 'import numpy; print("numpy", numpy.__version__)') already present"
  exit 0
fi
"$py" -m pip install --quiet "numpy==2.2.6" 2>/dev/null \
  || "$py" -m pip install --quiet --break-system-packages "numpy==2.2.6"
"$py" -c 'import numpy; print("setup-numpy: installed numpy", numpy.__version__)'
