"""`maxnucl-tpu-vm` from a checkout: python tools/tpu_vm.py COMMAND --name NAME ... (--help)."""
import sys

from maxnucl.tpu_vm import main

if __name__ == "__main__":
  sys.exit(main())
