"""Harmonize a composite from Python with the packaged default weights.

    python python/harmonize_image.py comp.jpg mask.png out.png

Files are read and written as ``python -m regharm_ext.harmonize`` does (EXIF orientation applied;
0/1 label masks, cut-out masks and 16-bit images converted; an empty or full mask and mismatched
sizes refused in one line; the output's folder created). The network runs at its training
resolution; its residual is upsampled and applied at the image's own resolution inside the mask.
"""
import sys

from regharm_ext.checkpoint import load_model
from regharm_ext.errors import one_line
from regharm_ext.harmonize import (InputError, check_output, harmonize_array, load_pair, rgb_icc_profile,
                                  save_image)

if len(sys.argv) != 4:
    sys.exit("usage: python python/harmonize_image.py IMAGE MASK OUT")
image_path, mask_path, out_path = sys.argv[1:]
try:
    # before the work, not after it; refuses an OUT that would overwrite IMAGE or MASK
    check_output(out_path, "OUT", inputs=(("IMAGE", image_path), ("MASK", mask_path)))
    image, mask = load_pair(image_path, mask_path)   # uint8 [H, W, 3] and [H, W] (255 = foreground)
    model, config = load_model(None)              # a run folder or .safetensors file works too
    out = harmonize_array(model, image, mask)     # uint8; pixels where the mask is 0 are unchanged
    # atomic (no partial file on failure), with the photo's colour profile (if it has one)
    save_image(out, out_path, icc_profile=rgb_icc_profile(image_path))
except (InputError, OSError) as e:                # the user's files: one line, no traceback
    sys.exit(f"error: {one_line(e)}")
print(f"{config['variant']} model -> {out_path}")
