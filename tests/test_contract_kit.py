"""The public testing kit's contract (``glance_lightning.testing.FamilyContract``) on the built-in families, as a
family package uses it: one subclass per family. The quick starts are the same runs tests/test_family_contract.py
reads (``fit_once``); that file adds the checks that need each family's stock-pipeline conventions."""

from __future__ import annotations

from conftest import REPO

from glance_lightning.testing import FamilyContract

CONTROL = "glance_lightning/assets/samples/edit/control/ball.png"


class TestFluxContract(FamilyContract):
    family, config, workdir = "flux", "configs/quickstart.yaml", str(REPO)
    stock_kwargs = {"max_sequence_length": 64}


class TestSD3Contract(FamilyContract):
    family, config, workdir = "sd3", "configs/quickstart-sd3.yaml", str(REPO)
    stock_kwargs = {"max_sequence_length": 32}


class TestQwenImageContract(FamilyContract):
    family, config, workdir = "qwen-image", "configs/quickstart-qwen-image.yaml", str(REPO)
    stock_kwargs = {"true_cfg_scale": 1.0}


class TestQwenImageEditContract(FamilyContract):
    family, config, workdir = "qwen-image-edit", "configs/quickstart-qwen-image-edit.yaml", str(REPO)
    prompt, controls = "Make the ball red", (CONTROL,)
    stock_kwargs = {"true_cfg_scale": 1.0}
