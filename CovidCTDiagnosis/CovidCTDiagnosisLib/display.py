"""How a result is shown, the same in report.html, the images the engine draws and the Slicer scene.

Constants only (no imports): the Slicer module reads them before its dependencies are installed.
"""

LUNG_WINDOW_LEVEL = -700.0  # HU: the lung window CT slices are shown in (and 8-bit slice images are assumed to be in)
LUNG_WINDOW_WIDTH = 1500.0  # HU
HEAT_COLORMAP = "inferno"  # Grad-CAM colours, 0 (dark) to 1 (bright yellow)
HEAT_THRESHOLD = 0.2  # Grad-CAM values below this are transparent: inferno's dark end would hide the lung
HEAT_OPACITY = 0.4  # of the heat map over the CT
