"""The command-line pipelines: image files (``explain``), videos, NIfTI volumes and image
folders into HDF5 (``dataset``). Each is a plain function the CLI calls; optional
dependencies (PyAV, nibabel, h5py) are imported inside them."""
