"""The decision transformer: hooks, the token layout, the causal mask, padding, files."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from interplab.rl.model import (
    DT_MODEL_KIND,
    TOKEN_KINDS,
    DecisionTransformer,
    DTConfig,
    load_dt,
    save_dt,
    token_index,
)

ENV = "MiniGrid-MemoryS7-v0"


def make_model(state_embedding: str = "linear", seed: int = 0, **kw) -> DecisionTransformer:
    torch.manual_seed(seed)
    cfg = DTConfig(
        **{
            "env": ENV,
            "context": 5,
            "max_timestep": 20,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "state_embedding": state_embedding,
            **kw,
        }
    )
    model = DecisionTransformer(cfg)
    # larger weights than the init so that every input visibly moves the logits
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def batch(b: int = 3, t: int = 5, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    rtg = torch.rand(b, t, generator=g)
    obs = torch.stack([torch.randint(0, n, (b, t, 7, 7), generator=g) for n in (11, 6, 3)], dim=-1).to(
        torch.uint8
    )
    actions = torch.randint(0, 7, (b, t), generator=g)
    start = torch.randint(0, 10, (b, 1), generator=g)
    timesteps = start + torch.arange(t)
    return rtg, obs, actions, timesteps


@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
@pytest.mark.parametrize("padded", [False, True])
def test_every_hook_replaced_with_itself_changes_nothing(state_embedding, padded):
    model = make_model(state_embedding)
    rtg, obs, actions, timesteps = batch()
    mask = None
    if padded:
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[0, :2] = False
    with torch.no_grad():
        ref = model(rtg, obs, actions, timesteps, mask)
        names = model.hook_names
        assert "hook_embed" in names and "hook_pos_embed" in names and "blocks.1.attn.hook_pattern" in names
        for name in names:
            out = model.run_with_hooks(
                rtg, obs, actions, timesteps, mask, fwd_hooks=[(name, lambda x, site: x.clone())]
            )
            assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        # all of them at once
        out = model.run_with_hooks(
            rtg, obs, actions, timesteps, mask, fwd_hooks=[(lambda n: True, lambda x, s: x)]
        )
        assert_close(out, ref, rtol=1e-5, atol=1e-5)
    logits, cache = model.run_with_cache(rtg, obs, actions, timesteps, mask)
    assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert set(cache.keys()) == set(names)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 15, 15)
    # the residual stream decomposes into embed + pos_embed + the components, as for a language model
    resid = cache["blocks.1.hook_resid_post"]
    assert_close(cache.decompose_resid().sum(), resid, rtol=1e-4, atol=1e-4)
    # the logits are the action head at the state tokens
    assert_close(cache["unembed.hook_out"][:, 1::3], ref, rtol=1e-5, atol=1e-5)


def test_token_layout_on_a_hand_made_trajectory():
    model = make_model(rtg_scale=2.0)
    rtg = torch.tensor([[0.9, 0.5, 0.1]])
    obs = torch.zeros(1, 3, 7, 7, 3, dtype=torch.uint8)
    obs[0, 0, 3, 6] = torch.tensor([5, 4, 0])  # a key (5), colour 4, state 0 in front of the agent
    obs[0, 1, 0, 0] = torch.tensor([2, 5, 0])  # a wall
    obs[0, 2, 6, 2] = torch.tensor([4, 1, 2])  # a locked door
    actions = torch.tensor([[2, 0, 6]])
    timesteps = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        got = model.embed(rtg, obs, actions, timesteps)[0]
    assert got.shape == (9, 32)
    tf = model.transformer
    w_rtg, b_rtg = model.rtg_embed.weight[:, 0], model.rtg_embed.bias
    table, b_state = (
        model.state_embed.weight,
        model.state_bias,
    )  # [7*7*20, d], one row per (cell, channel value)

    def state_embedding(view: torch.Tensor) -> torch.Tensor:
        total = b_state.clone()
        for i in range(7):
            for j in range(7):
                o, c, s = (int(v) for v in view[i, j])
                cell = (i * 7 + j) * 20
                total = total + table[cell + o] + table[cell + 11 + c] + table[cell + 17 + s]
        return total

    with torch.no_grad():
        for step in range(3):
            time = tf.pos_embed.W_pos[timesteps[0, step]]
            expected = {
                "rtg": w_rtg * rtg[0, step] / 2.0 + b_rtg + time,
                "state": state_embedding(obs[0, step]) + time,
                "action": tf.embed.W_E[actions[0, step]] + time,
            }
            for kind in TOKEN_KINDS:
                assert_close(got[token_index(step, kind)], expected[kind], rtol=1e-5, atol=1e-5)
    assert [token_index(1, k) for k in TOKEN_KINDS] == [3, 4, 5]
    assert DecisionTransformer.token_index(2, "state") == 7
    with pytest.raises(ValueError, match="token kind"):
        token_index(0, "reward")


@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
def test_logits_never_read_the_current_or_future_actions(state_embedding):
    model = make_model(state_embedding)
    rtg, obs, actions, timesteps = batch()
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(rtg, obs, actions, timesteps, names=["unembed.hook_out"])
        ref = ref_cache["unembed.hook_out"]
        for t in range(5):
            # a_t and everything after step t changed
            a2, r2, o2 = actions.clone(), rtg.clone(), obs.clone()
            a2[:, t:] = (a2[:, t:] + 1 + torch.arange(5 - t)) % 7
            r2[:, t + 1 :] += 3.0
            o2[:, t + 1 :, :, :, 0] = (o2[:, t + 1 :, :, :, 0] + 1) % 11
            _, cache = model.run_with_cache(r2, o2, a2, timesteps, names=["unembed.hook_out"])
            out = cache["unembed.hook_out"]
            # logits of steps <= t (read at state tokens) are unchanged
            assert_close(out[:, 1 : 3 * t + 2 : 3], ref[:, 1 : 3 * t + 2 : 3], rtol=1e-5, atol=1e-6)
            # ... while the change is visible: the action token a_t itself reads it (so the test can fail)
            assert (out[:, 3 * t + 2] - ref[:, 3 * t + 2]).abs().max() > 1e-3
            if t + 1 < 5:
                assert (out[:, 3 * (t + 1) + 1] - ref[:, 3 * (t + 1) + 1]).abs().max() > 1e-3
        logits = model(rtg, obs, actions, timesteps)
        for t in range(1, 5):  # a_{t-1} is read by step t's logits
            a2 = actions.clone()
            a2[:, t - 1] = (a2[:, t - 1] + 3) % 7
            changed = model(rtg, obs, a2, timesteps)
            assert (changed[:, t] - logits[:, t]).abs().amax(-1).min() > 1e-4
            assert_close(changed[:, : t - 1 + 1], logits[:, :t], rtol=1e-5, atol=1e-6)
        # R_t and s_t are read by step t's logits
        r2 = rtg.clone()
        r2[:, 2] += 1.0
        assert (model(r2, obs, actions, timesteps)[:, 2] - logits[:, 2]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
def test_left_padding_gives_the_unpadded_logits(state_embedding):
    model = make_model(state_embedding)
    rtg, obs, actions, timesteps = batch(b=2, t=3)
    with torch.no_grad():
        ref = model(rtg, obs, actions, timesteps)
        pad = 2
        rtg_p = torch.cat([torch.full((2, pad), float("nan")), rtg], 1)
        obs_p = torch.cat([torch.full((2, pad, 7, 7, 3), 200, dtype=torch.uint8), obs], 1)  # garbage
        act_p = torch.cat([torch.full((2, pad), -5), actions], 1)
        ts_p = torch.cat([torch.full((2, pad), 999), timesteps], 1)
        mask = torch.cat([torch.zeros(2, pad, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)], 1)
        out = model(rtg_p, obs_p, act_p, ts_p, mask)
        assert_close(out[:, pad:], ref, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out).all()
        # a batch mixing a padded and a full row: each row its own logits
        full = batch(b=1, t=5, seed=7)
        mixed = [torch.cat([x[:1], y], 0) for x, y in zip((rtg_p, obs_p, act_p, ts_p), full, strict=True)]
        mask2 = torch.cat([mask[:1], torch.ones(1, 5, dtype=torch.bool)], 0)
        out2 = model(*mixed, mask2)
        assert_close(out2[0, pad:], ref[0], rtol=1e-5, atol=1e-5)
        assert_close(out2[1], model(*full)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
def test_predict_is_the_last_step_with_no_action_yet(n_layers, state_embedding):
    """`predict` (without hooks: the last action token left out, the last block at the last state token
    only) equals the full forward's last step, padded or not, for every window length; with a hook on, the
    full forward runs and the hook sees every token."""
    model = make_model(state_embedding, n_layers=n_layers)
    for t in (1, 2, 5):
        rtg, obs, actions, timesteps = batch(t=t)
        mask = torch.ones(3, t, dtype=torch.bool)
        mask[1, : t - 1] = False  # a left-padded row
        for m in (None, mask):
            with torch.no_grad():
                full = model(rtg, obs, actions, timesteps, m)
                a2 = actions.clone()
                a2[:, -1] = -1  # unknown: anything goes there
                got = model.predict(rtg, obs, a2, timesteps, m)
                assert_close(got, full[:, -1], rtol=1e-5, atol=1e-5)
                seen = []
                hook = (
                    f"blocks.{n_layers - 1}.hook_mlp_out",
                    lambda x, hook, seen=seen: seen.append(x.shape[1]),
                )
                with model.hooks(fwd_hooks=[hook]):
                    assert_close(model.predict(rtg, obs, a2, timesteps, m), got, rtol=1e-5, atol=1e-5)
                assert seen == [3 * t]  # hooks see the whole window
    assert model.cfg.pad_action == 7
    assert actions[0, -1] != -1  # predict does not write into its input


@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
def test_save_load_round_trip_is_exact(tmp_path, state_embedding):
    model = make_model(state_embedding)
    path = save_dt(model, tmp_path / "dt")
    doc = json.loads((path / "config.json").read_text())
    assert doc["kind"] == DT_MODEL_KIND and doc["version"] == 1 and doc["state_embedding"] == state_embedding
    loaded = load_dt(path)
    assert loaded.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(v, v2), k
    rtg, obs, actions, timesteps = batch()
    with torch.no_grad():
        assert torch.equal(loaded(rtg, obs, actions, timesteps), model(rtg, obs, actions, timesteps))
    # a damaged weights file is named
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="model.safetensors"):
        load_dt(path)


def test_load_refuses_a_language_model_folder(tmp_path):
    from interplab.model import ModelConfig, Transformer

    Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=10, n_ctx=8)).save(tmp_path / "lm")
    with pytest.raises(ValueError, match="expected a decision-transformer model folder"):
        load_dt(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="not a decision-transformer folder"):
        load_dt(tmp_path)


def test_config_json_round_trip_and_validation():
    cfg = DTConfig(env=ENV, context=3, max_timestep=245, state_embedding="conv", obs_shape=[7, 7, 3])
    assert cfg.obs_shape == (7, 7, 3) and cfg.d_head == 16 and cfg.d_mlp == 256
    again = DTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert (
        cfg.model_config.n_ctx == 246 and cfg.model_config.d_vocab == 8 and cfg.model_config.d_vocab_out == 7
    )
    with pytest.raises(TypeError):
        DTConfig(ENV, 3, 245)  # type: ignore[misc]  # keyword-only
    with pytest.raises(ValueError, match="newer"):
        DTConfig.from_dict({**cfg.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown DTConfig fields"):
        DTConfig.from_dict({**cfg.to_dict(), "d_modle": 3})
    with pytest.raises(ValueError, match="not a decision-transformer config"):
        DTConfig.from_dict({**cfg.to_dict(), "kind": "model"})
    bad = [
        ({"context": 0}, "context"),
        ({"state_embedding": "mlp"}, "state_embedding='mlp' is not one of: linear, conv"),
        ({"rtg_scale": 0.0}, "rtg_scale"),
        ({"obs_values": (11, 6)}, "obs_values"),
        ({"env": ""}, "env"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            cfg.replace(**change)
    with pytest.raises(ValueError, match="divisible"):
        DTConfig(env=ENV, context=3, max_timestep=5, d_model=30, n_heads=4)


def test_bad_inputs_are_named():
    model = make_model()
    rtg, obs, actions, timesteps = batch()
    with pytest.raises(ValueError, match="context=5"):
        model(*batch(t=6))
    with pytest.raises(ValueError, match="obs must be"):
        model(rtg, obs[..., :2], actions, timesteps)
    with pytest.raises(ValueError, match="actions must be"):
        model(rtg, obs, actions[:, :2], timesteps)
    with pytest.raises(ValueError, match="actions must lie in 0..7, got \\d+"):
        model(rtg, obs, actions + 9, timesteps)
    with pytest.raises(ValueError, match="timesteps must lie in 0..20, got 21"):
        model(rtg, obs, actions, timesteps - timesteps + 21)
    obs2 = obs.clone()
    obs2[0, 0, 0, 0, 1] = 6
    with pytest.raises(ValueError, match="observation value 6 .* channel 1 has 6 values"):
        model(rtg, obs2, actions, timesteps)
    with pytest.raises(ValueError, match="unknown hook point"):
        model.run_with_hooks(
            rtg, obs, actions, timesteps, fwd_hooks=[("blocks.5.hook_resid_pre", lambda x, s: x)]
        )


def _episodes(n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``n`` random episodes of ``steps`` steps (returns to go, views, actions, timesteps from 0)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.stack([torch.randint(0, k, (n, steps, 7, 7), generator=g) for k in (11, 6, 3)], -1)
    rtg = torch.rand(n, steps, generator=g)
    actions = torch.randint(0, 7, (n, steps), generator=g)
    return rtg, obs.to(torch.uint8), actions, torch.arange(steps).expand(n, steps).contiguous()


def _window(x: torch.Tensor, t: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``..t`` of ``x`` [n, steps, ...] as `rollout` feeds them: the last ``context``, left-padded with
    zeros (and the mask) while fewer."""
    lo = max(0, t + 1 - context)
    w = x[:, lo : t + 1]
    pad = context - w.shape[1]
    mask = torch.cat(
        [torch.zeros(len(x), pad, dtype=torch.bool), torch.ones(len(x), w.shape[1], dtype=torch.bool)], 1
    )
    return torch.cat([torch.zeros(len(x), pad, *w.shape[2:], dtype=w.dtype), w], 1), mask


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("state_embedding", ["linear", "conv"])
def test_step_cache_equals_the_full_window(n_layers, state_embedding):
    """`predict_step` gives `predict`'s logits on the left-padded window at every step, while the episode fits
    the context (incremental: the new tokens against cached keys and values) and after the window has slid
    past it (a model of two layers or more: layer 0's cached inputs, the later layers recomputed on the
    window; one layer: still incremental); rows that start their episodes at other times (cleared mid-way),
    so that one call mixes rows inside and past the context, and subsets of rows do too."""
    model = make_model(state_embedding, n_layers=n_layers).eval()
    k = model.cfg.context
    n_steps = 2 * k + 2
    rtg, obs, actions, timesteps = _episodes(3, n_steps)
    cache = model.step_cache(3)
    done = [0, 0, 0]  # steps each row has played
    mixed = 0
    with torch.no_grad():
        for t in range(n_steps + 4):
            # row 2 starts 3 steps late (and is cleared then); some calls pass a subset, or another order
            rows = [0, 1] if t < 3 else ([0, 1, 2] if t % 4 else [2, 0]) if t < n_steps else [1, 2]
            rows = [r for r in rows if done[r] < n_steps]
            if not rows:
                continue
            if t == 3:
                cache.clear([2])
            local = torch.tensor([done[r] for r in rows])
            fit = cache.fits(rows)
            assert fit.tolist() == ((local < k) | (n_layers == 1)).tolist()
            mixed += int(len(set(fit.tolist())) > 1)
            ep = [(r, int(s)) for r, s in zip(rows, local.tolist(), strict=True)]
            got = model.predict_step(
                cache,
                rows,
                torch.stack([rtg[r, s] for r, s in ep]),
                torch.stack([obs[r, s] for r, s in ep]),
                torch.stack([actions[r, s - 1] if s else torch.tensor(5) for r, s in ep]),
                torch.stack([timesteps[r, s] for r, s in ep]),
            )
            for i, (r, s) in enumerate(ep):
                wins = [_window(x[r : r + 1], s, k) for x in (rtg, obs, actions, timesteps)]
                want = model.predict(*(w for w, _ in wins), attention_mask=wins[0][1])
                assert_close(got[i : i + 1], want, msg=lambda m, r=r, s=s: f"row {r} step {s}: {m}")
                done[r] += 1
    assert done == [n_steps] * 3 and cache.steps.tolist() == done  # every row slid past the context
    assert n_layers == 1 or mixed >= 2  # calls that mixed rows inside and past the context


def test_a_cache_that_slid_would_not_be_the_window():
    """Why `predict_step` recomputes the layers after the first for a 2-layer row past the context:
    continuing incrementally there (forced by faking its step count) gives other logits than the window,
    because layer 1's keys and values of the steps kept were computed attending to the step the window
    dropped."""
    model = make_model().eval()
    k = model.cfg.context
    rtg, obs, actions, timesteps = _episodes(1, k + 1)
    cache = model.step_cache(1)
    with torch.no_grad():
        for t in range(k + 1):
            if t == k:
                cache.steps[0] = k - 1  # pretend it still fits
            got = model.predict_step(
                cache, [0], rtg[:, t], obs[:, t], actions[:, t - 1] if t else actions[:, 0], timesteps[:, t]
            )
        wins = [_window(x, k, k) for x in (rtg, obs, actions, timesteps)]
        want = model.predict(*(w for w, _ in wins), attention_mask=wins[0][1])
    assert (got - want).abs().max() > 1e-3


def test_step_cache_from_inference_mode_continues_outside_it():
    """A cache filled under ``torch.inference_mode`` (as `rollout` runs) keeps inference tensors; clearing
    rows and stepping a subset afterwards under ``no_grad`` works and still equals the window."""
    model = make_model(n_layers=2).eval()
    k = model.cfg.context
    rtg, obs, actions, timesteps = _episodes(2, k + 2)
    cache = model.step_cache(2)
    with torch.inference_mode():
        for t in range(k + 1):
            prev = actions[:, t - 1] if t else actions[:, 0]
            model.predict_step(cache, [0, 1], rtg[:, t], obs[:, t], prev, timesteps[:, t])
    cache.clear([1])
    with torch.no_grad():
        got = model.predict_step(
            cache, [0], rtg[:1, k + 1], obs[:1, k + 1], actions[:1, k], timesteps[:1, k + 1]
        )
        fresh = model.predict_step(cache, [1], rtg[1:, 0], obs[1:, 0], actions[1:, 0], timesteps[1:, 0])
        wins = [_window(x[:1], k + 1, k) for x in (rtg, obs, actions, timesteps)]
        assert_close(got, model.predict(*(w for w, _ in wins), attention_mask=wins[0][1]))
        wins = [_window(x[1:], 0, k) for x in (rtg, obs, actions, timesteps)]
        assert_close(fresh, model.predict(*(w for w, _ in wins), attention_mask=wins[0][1]))
