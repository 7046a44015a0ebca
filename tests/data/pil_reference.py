"""The reference's per-frame PIL implementation of the RandAugment inc1 operations.

Used by the augmentation tests (numerics) and bench/pipeline.py (the baseline).
"""

from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)


def pil_op(name: str, arg, p: Image.Image) -> Image.Image:
    """The reference's PIL implementation of each inc1 operation."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(p)
    if name == "Equalize":
        return ImageOps.equalize(p)
    if name == "Invert":
        return ImageOps.invert(p)
    if name == "PosterizeIncreasing":
        return ImageOps.posterize(p, arg)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(p, arg)
    if name == "SolarizeAdd":
        return p.point([min(255, i + arg) if i < 128 else i for i in range(256)] * 3)
    if name == "BrightnessIncreasing":
        return ImageEnhance.Brightness(p).enhance(arg)
    if name == "ContrastIncreasing":
        return ImageEnhance.Contrast(p).enhance(arg)
    if name == "ColorIncreasing":
        return ImageEnhance.Color(p).enhance(arg)
    if name == "SharpnessIncreasing":
        return ImageEnhance.Sharpness(p).enhance(arg)
    if name == "Rotate":
        return p.rotate(arg, resample=Image.BICUBIC, fillcolor=FILL)
    w, h = p.size
    matrix = {
        "ShearX": (1, arg, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, arg * h),
    }[name]
    return p.transform(p.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)
