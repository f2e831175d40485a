"""Data: the embedded synthetic composites and the iHarmony4 loader.

``SyntheticComposites`` (:mod:`.synth`) makes composites on the fly from the packaged photos
(fixed validation photos: :mod:`.photo_set`); ``IHarmony4`` (:mod:`.iharmony4`) reads the real
dataset's on-disk layout. Both yield ``{"comp", "mask", "real", "name", "subset"}``.
"""
import importlib

# names resolved on first use, so that `python -m regharm_ext.data.synth` does not import its own
# module twice (runpy warns when the package has already imported it)
_EXPORTS = {
    "SyntheticComposites": ".synth", "IHarmony4": ".iharmony4", "DataError": ".iharmony4",
    "SUBSETS": ".iharmony4", "find_subsets": ".iharmony4", "photo_names": ".photo_set",
    "split_photos": ".photo_set",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
