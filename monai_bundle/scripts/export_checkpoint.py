"""Write the ``--ckpt_file`` that ``monai.bundle ckpt_export`` needs (a torch state dict of
``network_def``) from an encoder: ``python monai_bundle/scripts/export_checkpoint.py
ENCODER.safetensors model.pt``."""

import sys

from napari_strainer.bundle import export_checkpoint

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: export_checkpoint.py ENCODER.safetensors OUT.pt")
    print(export_checkpoint(sys.argv[1], sys.argv[2]))
