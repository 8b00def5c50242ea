"""dataprep's tokenizer actor with --compile: the same tokens as its default (channels_last, eager) path."""
import numpy as np
import pytest
import torch

from dataprep import images, pipeline
from stage1_tokenizer.config import PRESETS
from stage1_tokenizer.tokenizer import Tokenizer


@pytest.mark.slow
def test_compiled_encoder_actor_gives_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    views = images.expand_views("center,flip")
    crops = (np.random.default_rng(0).random((3 * len(views), 16, 16, 3)) * 255).astype(np.uint8)
    eager = pipeline.TokenizerActor(str(tmp_path / "ckpt"), 16, views, 18)
    compiled = pipeline.TokenizerActor(str(tmp_path / "ckpt"), 16, views, 18, compile=True)
    a = eager.encode_pixels(crops.tobytes(), 3)
    b = compiled.encode_pixels(crops.tobytes(), 3)
    assert a.shape == (6, 64) and np.array_equal(a, b)
    # and the default path (channels_last) equals plain NCHW fp32 encoding
    ref = Tokenizer.from_checkpoint(tmp_path / "ckpt").encode(images.to_model_input(crops)).reshape(6, -1).numpy()
    assert np.array_equal(a, ref)
