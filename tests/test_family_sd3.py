"""What only the SD3/3.5 family does, on the tiny SD3 model: ordinary classifier-free guidance against a negative
prompt (the stock pipeline's CFG). Training, the quick start, stock-pipeline LoRAs and the 0-1000 timestep
convention are the family contract's (test_family_contract.py)."""

from __future__ import annotations

import pytest
import torch

from glance_lightning.families.sd3 import SD3Glance
from glance_lightning.settings import TimestepSettings

# SD3's 50-step schedule at 1024x1024 (shift 3.0), indices 0,2,4,6,8 and 10,20,30,40,49
SLOW = [1000.0, 986.0571, 971.3141, 955.7004, 939.1364]
FAST = [921.5326, 813.8521, 656.9132, 406.8929, 8.9286]


@pytest.fixture(scope="module")
def loaded() -> SD3Glance:
    """A loaded, untrained module (adapters at their init: lora_B = 0, so the base model's output)."""
    module = SD3Glance(pretrained_model="tiny:sd3", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                       max_sequence_length=32)
    module.load_base_model()
    module.transformer.eval()
    return module


def test_guided_velocity_is_ordinary_cfg(loaded: SD3Glance):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    sigma = torch.full((2,), 0.7)
    pos, neg = loaded.conditioning_for("a red ball"), loaded.conditioning_for("blurry")
    with torch.no_grad():
        v_pos = loaded.predict_velocity(noisy, sigma, pos)
        v_neg = loaded.predict_velocity(noisy, sigma, neg)
        torch.testing.assert_close(loaded.guided_velocity(noisy, sigma, pos, neg, 1.0), v_pos)
        torch.testing.assert_close(loaded.guided_velocity(noisy, sigma, pos, None, 1.0), v_pos)
        guided = loaded.guided_velocity(noisy, sigma, pos, neg, 4.5)
        torch.testing.assert_close(guided, v_neg + 4.5 * (v_pos - v_neg), atol=1e-5, rtol=1e-5)
        assert (guided - v_pos).abs().max() > 1e-3
        # without a negative prompt, the pipeline's default (the empty prompt) is the unconditional branch
        v_empty = loaded.predict_velocity(noisy, sigma, loaded.conditioning_for(""))
        torch.testing.assert_close(
            loaded.guided_velocity(noisy, sigma, pos, None, 3.0), v_empty + 3.0 * (v_pos - v_empty),
            atol=1e-5, rtol=1e-5,
        )
