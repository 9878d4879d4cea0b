"""The training fast paths of modeling_flamingo against the plain formulations they replace.

`FrozenMediaProjection` computes the perceiver's media keys and values with a hand-written backward pass (one
product instead of autograd's two); it must give the plain modules' outputs and gradients. Tolerances: outputs to
1e-6 (the forward pass runs the same float32 operations), gradients to 1e-5 of the largest entry of each gradient
(the same sums, added in another order)."""

import pytest
import torch
from einops import rearrange
from tiny_models import IMAGE, tiny_config, tiny_model

from flamingo.modeling_flamingo import FrozenMediaProjection, PerceiverBlock, attend


def randomized_block(seed: int = 0) -> PerceiverBlock:
    """A perceiver block whose norms are not at 1 and 0 (the fresh values hide a swapped or dropped weight)."""
    torch.manual_seed(seed)
    block = PerceiverBlock(tiny_config())
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return block


def plain_block_forward(block: PerceiverBlock, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """The block as OpenFlamingo writes it: keys and values projected from [norm(media); norm(latents)]."""
    media, normed_latents = block.norm_media(media), block.norm_latents(latents)
    query = block.to_q(normed_latents)
    key, value = block.to_kv(torch.cat([media, normed_latents], dim=1)).chunk(2, dim=-1)
    query, key, value = (rearrange(x, "n t (h d) -> n h t d", h=block.heads) for x in (query, key, value))
    latents = block.to_out(attend(block, query, key, value, None, block.scale)) + latents
    return block.feed_forward(latents) + latents


def gradients(block: PerceiverBlock, forward, latents, media) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    block.zero_grad(set_to_none=True)
    latents = latents.detach().requires_grad_(True)
    output = forward(latents, media)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return output.detach(), grads | {"latents": latents.grad.clone()}


def test_frozen_media_projection_gradients_are_exact_in_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=generator)
    weight, bias = (torch.randn(8, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(2))
    kv_weight = torch.randn(12, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b, kv: FrozenMediaProjection.apply(x, w, b, kv, 1e-5), (weight, bias, kv_weight))


def test_perceiver_block_training_pass_equals_the_concatenated_projection():
    block = randomized_block()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 8, 32, generator=generator)
    media = torch.randn(4, 2 * 16, 32, generator=generator)  # two frames of 16 patches: frozen features, no grad
    fast_output, fast = gradients(block, block, latents, media)
    plain_output, plain = gradients(block, lambda lat, med: plain_block_forward(block, lat, med), latents, media)
    torch.testing.assert_close(fast_output, plain_output, rtol=0, atol=1e-6)
    assert fast.keys() == plain.keys()
    for name, expected in plain.items():
        difference, scale = (fast[name] - expected).abs().max().item(), expected.abs().max().item()
        assert difference <= 1e-5 * scale, f"{name}: gradients differ by {difference:.2e} (largest entry {scale:.2e})"


def test_trainable_vision_features_take_the_plain_path_and_get_gradients():
    block = randomized_block()
    media = torch.randn(2, 16, 32, requires_grad=True)
    block(torch.randn(2, 8, 32), media).sum().backward()
    assert media.grad is not None and media.grad.abs().sum() > 0


def test_under_bfloat16_autocast_gradients_keep_the_parameters_dtype():
    block = randomized_block()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = block(torch.randn(2, 8, 32), torch.randn(2, 16, 32))
    output.float().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_training_forward_gives_the_inference_logits(lm):
    """The trainable-perceiver forward (fast paths on) and the no-grad one (plain paths) give the same logits."""
    model = tiny_model(lm)
    model.set_trainable()
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 97, (2, 12), generator=generator)
    input_ids[:, [1, 6]] = IMAGE
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected = model(input_ids=input_ids, vision_x=vision_x).logits
    logits = model(input_ids=input_ids, vision_x=vision_x).logits
    assert logits.requires_grad
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-5)


def labelled_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """Two rows with two images, left padding in row 1, and labels on a few answer-like spans only."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (2, 12), generator=generator)
    input_ids[:, [1, 6]] = IMAGE
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 3:6], labels[0, 9:], labels[1, 8:11] = input_ids[0, 3:6], input_ids[0, 9:], input_ids[1, 8:11]
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "vision_x": vision_x}


def loss_and_gradients(model, **inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("lm", ["llama", "mpt", "gpt_neox"])
@pytest.mark.parametrize("all_labels", [False, True], ids=["answers", "all tokens"])
@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_loss_only_gives_the_full_computation_s_loss_and_gradients(lm, all_labels, num_items_in_batch):
    """`loss_only=True` (the head at the supervised positions, its gradients formed in the forward pass) against the
    language model's own loss on full logits; the output embeddings train (Otter's recipe: the added tokens' rows)."""
    model = tiny_model(lm)
    model.set_trainable()
    inputs = labelled_batch()
    if all_labels:
        inputs["labels"] = inputs["input_ids"].clone()
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    full, expected = loss_and_gradients(model, **inputs, **extra)
    fast, grads = loss_and_gradients(model, **inputs, **extra, loss_only=True)
    assert fast.logits is None and full.logits is not None
    assert abs(fast.loss.item() - full.loss.item()) <= 1e-6 * max(1.0, abs(full.loss.item()))
    head = [name for name, p in model.named_parameters() if p is model.get_output_embeddings().weight]  # maybe tied
    assert grads.keys() == expected.keys() and head and head[0] in grads
    for name, gradient in expected.items():
        difference = (grads[name] - gradient).abs().max().item()
        assert difference <= 1e-6 * max(1.0, gradient.abs().max().item()), f"{name}: gradients differ by {difference:.2e}"


def test_loss_only_in_float64_passes_gradcheck():
    from flamingo.modeling_flamingo import SupervisedTokenLoss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=generator, requires_grad=True)
    targets, denominator = torch.tensor([0, 8, 3, 3, 1]), torch.tensor(4.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w, b: SupervisedTokenLoss.apply(h, w, b, targets, denominator), (hidden, weight, bias))


def test_loss_only_without_grad_and_without_labels():
    model = tiny_model()
    inputs = labelled_batch()
    with torch.no_grad():
        expected = model(**inputs).loss
        assert torch.allclose(model(**inputs, loss_only=True).loss, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="loss_only=True computes the loss alone; pass labels"):
        model(input_ids=inputs["input_ids"], vision_x=inputs["vision_x"], loss_only=True)


def test_loss_only_on_a_language_model_outside_the_plain_heads_takes_the_full_computation():
    model = tiny_model("opt")
    inputs = labelled_batch()
    with torch.no_grad():
        expected, outputs = model(**inputs).loss, model(**inputs, loss_only=True)
    assert outputs.logits is None and torch.equal(outputs.loss, expected)


@pytest.mark.parametrize("lm", ["llama", "mpt", "gpt_neox"])
def test_loss_only_runs_the_last_feed_forward_at_the_supervised_positions_only(lm):
    """The last decoder layer's feed-forward sees only the supervised positions (the loss is checked against the full
    computation above); the others, and the module afterwards, are as before."""
    from flamingo.modeling_flamingo import DECODER_FEED_FORWARD

    model = tiny_model(lm)
    model.set_trainable()
    inputs = labelled_batch()
    supervised = int((inputs["labels"][:, 1:] != -100).sum())
    rows_seen = {}
    for index, layer in enumerate(model.decoder_layers):
        feed_forward = layer.decoder_layer.get_submodule(DECODER_FEED_FORWARD[lm])
        first_linear = next(m for m in feed_forward.modules() if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_pre_hook(lambda m, args, index=index: rows_seen.update({index: args[0].shape[:-1].numel()}))
    model(**inputs, loss_only=True).loss.backward()
    last = len(model.decoder_layers) - 1
    assert rows_seen[last] == supervised < inputs["input_ids"].numel()
    assert all(rows == inputs["input_ids"].numel() for index, rows in rows_seen.items() if index != last)
    assert "forward" not in model.decoder_layers[last].decoder_layer.get_submodule(DECODER_FEED_FORWARD[lm]).__dict__
    for call in ({}, {"loss_only": True, "output_hidden_states": True}):  # every position: plain, or hidden states asked
        rows_seen.clear()
        model(**inputs, **call)
        assert rows_seen[last] == inputs["input_ids"].numel()


def test_perceiver_block_broadcasts_one_set_of_latents_as_the_images_own_copies():
    """The first block takes the learned latents once, (1, n, D), for all images: the same outputs and latent
    gradients as with a copy per image."""
    block = randomized_block()
    media = torch.randn(3, 5, block.norm_media.normalized_shape[0])
    latents = torch.randn(1, 4, media.shape[-1])
    shared, shared_grads = gradients(block, block, latents, media)
    copies, copies_grads = gradients(block, lambda x, m: block(x.expand(3, -1, -1), m), latents, media)
    torch.testing.assert_close(shared, copies, rtol=0, atol=1e-6)
    for name, gradient in copies_grads.items():
        torch.testing.assert_close(shared_grads[name], gradient, rtol=0, atol=1e-5 * max(1.0, gradient.abs().max().item()))


def test_loss_only_under_gradient_checkpointing_gives_the_full_computation_s_gradients():
    """Checkpointed layers run again in the backward pass, so there the last feed-forward runs at every position."""
    model = tiny_model()
    model.set_trainable()
    model.train()
    inputs = labelled_batch()
    full, expected = loss_and_gradients(model, **inputs)
    model.gradient_checkpointing_enable()
    fast, grads = loss_and_gradients(model, **inputs, loss_only=True)
    assert abs(fast.loss.item() - full.loss.item()) <= 1e-6
    for name, gradient in expected.items():
        assert (grads[name] - gradient).abs().max().item() <= 1e-6 * max(1.0, gradient.abs().max().item()), name


def test_feed_forward_at_keeps_a_hook_s_forward_wrapper():
    """accelerate's hooks replace `module.forward` on the instance: it is called at the rows, and put back after."""
    from flamingo.modeling_flamingo import feed_forward_at

    module, calls = torch.nn.Linear(3, 2), []

    def hooked_forward(x, plain=module.forward):
        calls.append(x.shape)
        return plain(x)

    module.forward = hooked_forward
    x = torch.randn(2, 4, 3)
    with feed_forward_at(module, torch.tensor([1, 6])):
        output = module(x)
    assert calls == [torch.Size([1, 2, 3])] and module.forward is hooked_forward
    expected = torch.zeros(8, 2)
    expected[[1, 6]] = torch.nn.functional.linear(x.flatten(0, 1)[[1, 6]], module.weight, module.bias)
    torch.testing.assert_close(output, expected.view(2, 4, 2), rtol=0, atol=1e-6)
