"""CovidCT engine: COVID-19 diagnosis from chest CT with DRENet (Song et al. 2021), without Slicer.

`from CovidCTDiagnosisLib import Analyzer, analyze` gives the Python API (see pipeline.py).
Importing the package itself is light: torch is loaded only when the API is first used, so
the Slicer module can import it before its dependencies are installed.
"""

__version__ = "0.1.0"
__all__ = ["Analyzer", "analyze", "__version__"]


def __getattr__(name):
    if name in ("Analyzer", "analyze"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
