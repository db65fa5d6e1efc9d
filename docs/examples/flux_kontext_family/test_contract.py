"""The kontext-example family against the whole family contract: `pytest test_contract.py` in this folder."""

from glance_lightning.testing import FamilyContract


class TestKontextContract(FamilyContract):
    family = "kontext-example"
    config = "quickstart.yaml"
    prompt = "Make the ball red"
    controls = ("data/control/ball.png",)

    def test_the_family_comes_from_its_package(self):
        import flux_kontext_family

        assert self.spec().module_class() is flux_kontext_family.KontextGlance
        assert self.spec().like == "flux" and self.spec().guidance_kind == "embedded"
