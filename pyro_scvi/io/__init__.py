"""Model files, read without executing code from them, and count-matrix inputs.

* :mod:`.native`: pyro-scvi's own format (write and read);
* :mod:`.scvi_tools`: scvi-tools 1.x format (write, read, parameter names, ``init_params_``);
* :mod:`.legacy`: conversion of pre-0.15 scvi-tools saves;
* :mod:`.model_dir`: read whichever format a directory holds;
* :mod:`.model_file`: the ``model.pt`` file both formats share;
* :mod:`.safe_unpickle`: the allow-list loader every read goes through;
* :mod:`.tenx`: 10x Genomics ``.h5`` files and matrix directories.
"""

from .legacy import convert_legacy_save
from .model_dir import load_registry, read_model_dir, view_setup_args
from .native import FORMAT, FORMAT_VERSION, history_to_safe, to_safe, write_model_dir
from .scvi_tools import scanvi_classifier_softmax, write_scvi_tools_model

__all__ = ["FORMAT", "FORMAT_VERSION", "history_to_safe", "to_safe", "write_model_dir", "read_model_dir",
           "write_scvi_tools_model", "scanvi_classifier_softmax", "load_registry", "view_setup_args",
           "convert_legacy_save"]
