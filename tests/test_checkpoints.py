"""A dynexit checkpoint gives back the model that was saved, of every family: the same outputs, from the
trained weights or (``ema=True``) the EMA weights saved beside them."""
import pytest
import torch

import dynexit
from dynexit.models.checkpoint import load_model, save_model

SIZE = 28  # the smallest size every family takes (MSDNet: 28-32 px)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


@pytest.mark.parametrize("name", ["tiny_perceiver_t16", "msdnet_small", "branchy_resnet_tiny"])
def test_a_checkpoint_gives_back_the_saved_model_and_its_ema(tmp_path, name):
    torch.manual_seed(0)
    model = dynexit.create_model(name, input_size=SIZE).eval()
    ema = dynexit.create_model(name, input_size=SIZE).eval()  # other random weights
    with torch.no_grad():  # non-trivial BatchNorm statistics, which the checkpoint must carry too
        for m in (model, ema):
            for b in m.modules():
                if isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
                    b.running_mean.uniform_(-0.5, 0.5)
                    b.running_var.uniform_(0.5, 1.5)
    save_model(tmp_path / "model.pt", model, ema=ema.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_ema = model(x), ema(x)
        got, got_ema = load_model(tmp_path / "model.pt")(x), load_model(tmp_path / "model.pt", ema=True)(x)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_ema, want_ema))
    assert not torch.equal(got[-1], got_ema[-1])
    assert not load_model(tmp_path / "model.pt").training
