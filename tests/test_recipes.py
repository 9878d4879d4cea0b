"""Trainable-set helper and gradient checkpointing."""

import torch
from tiny_models import EOC, IMAGE, batch, tiny_model


def loss_and_grads(model):
    input_ids, attention_mask, vision_x = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, vision_x=vision_x, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_set_trainable_follows_otters_recipe():
    model = tiny_model().train()
    model.set_trainable()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("perceiver.", "lang_encoder.model.embed_tokens", "lang_encoder.lm_head")) or ".gated_cross_attn_layer." in n for n in trainable)
    assert any(n.startswith("perceiver.") for n in trainable) and any(".gated_cross_attn_layer." in n for n in trainable)
    assert not any(n.startswith("vision_encoder.") or ".decoder_layer." in n for n in trainable)
    _, grads = loss_and_grads(model)
    for name in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"):
        rows_with_gradient = grads[name].abs().sum(-1).nonzero().flatten().tolist()
        assert rows_with_gradient and set(rows_with_gradient) <= {EOC, IMAGE}
    model.set_trainable(language_model=True, vision_encoder=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_encoder.post_layernorm.weight", "vision_encoder.post_layernorm.bias"}  # pools only CLS
    _, grads = loss_and_grads(model)
    assert grads["lang_encoder.lm_head.weight"].abs().sum(-1).nonzero().numel() > 2  # row masks are gone


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    model = tiny_model().train()
    model.set_trainable(language_model=True)
    loss, grads = loss_and_grads(model)

    calls = {"decoder": 0, "xattn": 0}
    layer = model.decoder_layers[1]
    # Hooks on children: a checkpointed layer's own hooks stay outside the checkpoint.
    layer.decoder_layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    layer.gated_cross_attn_layer.feed_forward.register_forward_pre_hook(lambda *_: calls.__setitem__("xattn", calls["xattn"] + 1))
    loss_and_grads(model)
    assert calls == {"decoder": 1, "xattn": 1}

    model.activation_checkpointing_enable()
    calls.update(decoder=0, xattn=0)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model)
    assert calls == {"decoder": 2, "xattn": 2}  # forward, then again during backward
    assert torch.equal(loss, checkpointed_loss)
    assert grads.keys() == checkpointed_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], checkpointed_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_adamw_is_fused_on_cpu_and_steps_as_the_default_loop():
    """`recipes.adamw` (otter-train's optimizer) uses torch's fused kernel on CPU; after three steps every trained
    parameter equals the default AdamW's over the same groups to 1e-6 (the same update, rounded in another order)."""
    from flamingo import recipes

    models = [tiny_model().train() for _ in range(2)]
    for model in models:
        model.set_trainable()
    optimizers = [recipes.adamw(models[0], 1e-2, 0.1),
                  torch.optim.AdamW(recipes.parameter_groups(models[1], 0.1), lr=1e-2)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    assert [group["weight_decay"] for group in optimizers[0].param_groups] == [0.1, 0.0]
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            loss_and_grads(model)
            optimizer.step()
    fused, plain = (dict(model.named_parameters()) for model in models)
    assert any(not torch.equal(fused[name], tiny_model().state_dict()[name]) for name in fused)  # it did train
    for name, parameter in fused.items():
        torch.testing.assert_close(parameter, plain[name], rtol=0, atol=1e-6, msg=name)


def test_weight_decay_falls_on_the_cross_attention_matrices_only():
    from flamingo.recipes import decays

    block = "lang_encoder.model.layers.1.gated_cross_attn_layer."
    decayed = [block + name for name in ("attn.to_q.weight", "attn.to_kv.weight", "attn.to_out.weight",
                                         "feed_forward.1.weight", "feed_forward.3.weight")]
    kept = [block + name for name in ("attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias",
                                      "feed_forward.0.weight", "feed_forward.0.bias")]
    kept += ["perceiver.layers.0.to_q.weight", "lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"]
    assert [name for name in decayed + kept if decays(name)] == decayed
