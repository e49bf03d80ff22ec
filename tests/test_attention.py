"""The fused attention path (SDPA) against the explicit-softmax reference."""
import pytest
import torch

import common as C


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_attention_matches_reference(causal, padding):
    torch.manual_seed(0)
    B, H, N, Dh = 3, 4, 17, 16
    q, k, v = (torch.randn(B, H, N, Dh, requires_grad=True) for _ in range(3))
    mask = None
    if padding:  # key padding: sample b attends to its first 17 - 3b keys only
        lengths = torch.tensor([17, 14, 11])
        mask = (torch.arange(N)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, N)
    out = C.attention(q, k, v, mask, causal)
    ref = C.attention_reference(q, k, v, mask, causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_is_not_trivially_equal():
    """Masking must change the result, so the tests above can fail."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    assert not torch.allclose(C.attention_reference(q, k, v, causal=True), C.attention_reference(q, k, v))


def test_models_fused_equals_reference():
    torch.manual_seed(0)
    model = C.build_clip(image_size=32, patch=8, width=64, layers=2, heads=4, embed_dim=32, text_width=64,
                         text_layers=2, text_heads=4, vocab_size=100, context_length=12).eval()
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 99, (2, 12))
    with torch.no_grad():
        a = model(x, ids)
        b = C.set_fused(model, False)(x, ids)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, atol=1e-5, rtol=1e-5)
