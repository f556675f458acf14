"""The main job: `pyro-scvi demo` on its built-in default data."""

import anndata
import numpy as np

from pyro_scvi import SCVI
from pyro_scvi.cli import main


def test_demo_writes_latent_and_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pyro-scvi demo" in out and "silhouette" in out
    written = anndata.read_h5ad(tmp_path / "demo.h5ad")
    assert written.obsm["X_scVI"].shape == (1200, 10) and np.isfinite(written.obsm["X_scVI"]).all()
    np.testing.assert_allclose(written.layers["scvi_normalized"].sum(1), 1e4, rtol=1e-3)
    model = SCVI.load(tmp_path / "model", adata=written)
    np.testing.assert_allclose(model.get_latent_representation(), written.obsm["X_scVI"], rtol=1e-5, atol=1e-6)
