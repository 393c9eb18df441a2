"""rl/analysis against planted ground truth: a hand-built decision transformer whose state embedding writes the
instruction object into a known residual direction (e0) and whose head L1H0 alone carries it to the decision
token (into e3, which the action head reads). Probes must find it exactly downstream of the write, patching
must localise it to that head (and the residual stream on its path), DLA must add up to the logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from interplab.rl.analysis import (
    BALL,
    KEY,
    Windows,
    action_dla,
    attention_figure,
    attention_pattern,
    cache_trajectories,
    palette_obs,
    patch_instruction,
    probe,
    steer,
    token_labels,
    windows,
)
from interplab.rl.model import DecisionTransformer, DTConfig
from interplab.rl.trajectories import Trajectories

K = 4  # context (steps per window) and episode length
CELL = (3, 5)  # the view cell (in front of the agent) where the instruction object shows at step 0
E0, E1, E2, E3, E5 = (
    0,
    1,
    2,
    3,
    5,
)  # instruction, state-token flag, timestep-0 flag, carried instruction, filler


def planted_model() -> DecisionTransformer:
    cfg = DTConfig(
        env="MiniGrid-MemoryS7-v0",
        context=K,
        max_timestep=10,
        d_model=8,
        n_layers=2,
        n_heads=2,
        d_head=4,
        d_mlp=8,
        normalization="none",
    )
    model = DecisionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # state embedding: the object at CELL writes +1 (ball) / -1 (key) on e0; every state token gets e1
        cell = CELL[0] * cfg.obs_shape[1] + CELL[1]
        width = sum(cfg.obs_values)
        model.state_embed.weight[cell * width + BALL, E0] = 1.0
        model.state_embed.weight[cell * width + KEY, E0] = -1.0
        model.state_bias[E1] = 1.0
        tf = model.transformer
        tf.pos_embed.W_pos[0, E2] = 1.0  # the tokens of timestep 0
        # L0H1: uniform attention copying the state flag into e5 (busy, but instruction-blind)
        tf.blocks[0].attn.W_V[1, E1, 0] = 1.0
        tf.blocks[0].attn.W_O[1, 0, E5] = 1.0
        # L1H0: state tokens attend to the state token of timestep 0 and copy its e0 into e3
        tf.blocks[1].attn.W_Q[0, E1, 0] = 40.0
        tf.blocks[1].attn.W_K[0, E1, 0] = 1.0
        tf.blocks[1].attn.W_K[0, E2, 0] = 1.0
        tf.blocks[1].attn.W_V[0, E0, 0] = 1.0
        tf.blocks[1].attn.W_O[0, 0, E3] = 1.0
        # the action head: e3 > 0 (ball) -> left, e3 < 0 (key) -> right
        tf.unembed.W_U[E3, 0] = 2.0
        tf.unembed.W_U[E3, 1] = -2.0
    return model


def random_model(seed: int) -> DecisionTransformer:
    """A DT with large random weights (LayerNorm, MLPs): no structure, for identities that must hold anyway."""
    torch.manual_seed(seed)
    model = DecisionTransformer(
        DTConfig(env="MiniGrid-MemoryS7-v0", context=3, max_timestep=10, d_model=16, n_layers=2, n_heads=2)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def planted_trajs(instructions: list[int]) -> Trajectories:
    """One episode of K steps per instruction (0 key, 1 ball): empty views, the object in view at step 0
    only, the same actions and rewards everywhere (the last action: the turn the instruction asks for)."""
    n = len(instructions)
    obs = np.zeros((n, K, 7, 7, 3), dtype=np.uint8)
    obs[..., 0] = 1  # empty
    for e, inst in enumerate(instructions):
        obs[e, 0, CELL[0], CELL[1]] = (BALL if inst else KEY, 1, 0)
    actions = np.full((n, K), 2, dtype=np.int64)
    actions[:, -1] = [0 if inst else 1 for inst in instructions]
    rewards = np.zeros((n, K), dtype=np.float32)
    rewards[:, -1] = 0.9
    dones = np.zeros((n, K), dtype=bool)
    dones[:, -1] = True
    return Trajectories(
        env="MiniGrid-MemoryS7-v0",
        obs=obs.reshape(n * K, 7, 7, 3),
        actions=actions.reshape(-1),
        rewards=rewards.reshape(-1),
        dones=dones.reshape(-1),
        episode_starts=np.arange(0, n * K + 1, K, dtype=np.int64),
        seeds=np.arange(n, dtype=np.int64),
    )


INSTRUCTIONS = [e % 2 for e in range(40)]


def test_windows_are_left_padded_and_end_at_their_step() -> None:
    trajs = planted_trajs([1, 0])
    win = windows(trajs, 3, ends=[0, 2, 5])
    assert_close(win.mask, torch.tensor([[False, False, True], [True, True, True], [False, True, True]]))
    assert_close(win.timesteps, torch.tensor([[0, 0, 0], [0, 1, 2], [0, 0, 1]]))
    assert_close(win.episode, torch.tensor([0, 0, 1]))
    assert_close(win.obs[2, 1], torch.as_tensor(trajs.obs[4]))
    assert_close(win.obs[0, 0], torch.zeros(7, 7, 3, dtype=torch.uint8))
    assert_close(win.rtg[1], torch.tensor([0.9, 0.9, 0.9]))
    assert token_labels(win, 2)[:3] == ["pad"] * 3
    assert token_labels(win, 2)[3:6] == ["R0=0.90", "s0", "a0=forward"]
    with pytest.raises(ValueError, match="flat step indices"):
        windows(trajs, 3, ends=[8])


def test_cache_rows_carry_their_metadata_and_match_a_plain_forward() -> None:
    model, trajs = planted_model(), planted_trajs([1, 0, 1])
    site = "blocks.1.hook_resid_post"
    cache = cache_trajectories(model, trajs, [site, "blocks.0.attn.hook_z"], batch_size=5)
    n = len(trajs.actions)
    assert cache[site].shape == (3 * n, 8) and cache["blocks.0.attn.hook_z"].shape == (3 * n, 8)
    assert_close(cache.flat_step, torch.arange(n).repeat_interleave(3))
    assert_close(cache.step, torch.arange(K).repeat(3).repeat_interleave(3))
    assert_close(cache.kind, torch.tensor([0, 1, 2]).repeat(n))
    # the reference: run the window ending at step 5 and read its last state token
    win = windows(trajs, K, ends=[5])
    store = {}
    with model.transformer.hooks(read_hooks=[(site, lambda a, s: store.setdefault("a", a))]):
        logits = model(*win.inputs())
    row = int(cache.rows("state")[5])
    assert_close(cache[site][row], store["a"][0, 3 * (K - 1) + 1])
    assert_close(cache.logits[5], logits[0, -1])
    with pytest.raises(ValueError, match="attention_figure"):
        cache_trajectories(model, trajs, ["blocks.0.attn.hook_pattern"])


def test_probe_is_exact_downstream_of_the_write_and_chance_before() -> None:
    model, trajs = planted_model(), planted_trajs(INSTRUCTIONS)
    labels = torch.tensor(INSTRUCTIONS).repeat_interleave(K)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    last = torch.as_tensor(trajs.episode_starts[1:] - 1)
    decision = probe(cache_trajectories(model, trajs, sites, ends=last), labels, label="instruction")
    # at the decision token the instruction arrives with L1H0 only
    assert_close(decision.test_scores[2], torch.tensor(1.0))
    for acc in decision.test_scores[:2].tolist():  # identical activations: the probe guesses one class
        assert min(abs(acc - decision.chance), abs(acc - (1 - decision.chance))) < 1e-6
        assert acc <= decision.chance + 1e-6
    # at the first state token it is in the stream from the embedding on
    first = torch.as_tensor(trajs.episode_starts[:-1])
    start = probe(cache_trajectories(model, trajs, sites, ends=first), labels)
    assert_close(start.test_scores, torch.ones(3))
    assert decision.n_test == 10 * 1 and decision.n_train == 30  # episodes held out, one row each
    # the held-out episodes are drawn per class: both splits hold both instructions
    assert decision.chance == 0.5
    with pytest.raises(ValueError, match="one class only"):
        probe(cache_trajectories(model, trajs, sites[:1], ends=last), torch.zeros_like(labels))
    assert len(decision.plot().data) == 2


def _pair(n: int = 6) -> tuple[Windows, Windows]:
    insts = [1] * n
    clean = planted_trajs(insts)
    corrupt = planted_trajs([0] * n)
    ends = clean.episode_starts[1:] - 1
    c = windows(clean, K, ends=ends)
    # differ only in the instruction object: the same actions (the clean episode's)
    k = windows(corrupt, K, ends=ends).replace(actions=c.actions)
    return c, k


def test_patching_localises_the_instruction_to_its_carrier() -> None:
    model = planted_model()
    clean, corrupt = _pair()
    res = patch_instruction(model, clean, corrupt, answer=0, wrong=1)
    assert_close(torch.tensor(res.clean_metric), torch.tensor(4.0), atol=1e-5, rtol=0)
    assert_close(torch.tensor(res.corrupt_metric), torch.tensor(-4.0), atol=1e-5, rtol=0)
    s0, s_last = 1, 3 * (K - 1) + 1
    heads = torch.zeros(2, 2)
    heads[1, 0] = 1.0
    assert_close(res.normalized("heads"), heads, atol=1e-5, rtol=0)
    resid = torch.zeros(2, 3 * K)
    resid[:, s0] = 1.0  # e0 at the first state token, before and after layer 0
    assert_close(res.normalized("resid"), resid, atol=1e-5, rtol=0)
    attn = torch.zeros(2, 3 * K)
    attn[1, s_last] = 1.0
    assert_close(res.normalized("attn"), attn, atol=1e-5, rtol=0)
    assert_close(res.normalized("mlp"), torch.zeros(2, 3 * K), atol=1e-5, rtol=0)
    assert res.results["resid"].labels["pos"][s0] == "s0"
    # noising is the mirror image: the clean run loses its answer exactly where denoising restored it
    noise = patch_instruction(
        model, clean, corrupt, answer=0, wrong=1, direction="noise", components=["heads"]
    )
    assert_close(noise.results["heads"].values, 4.0 - 8.0 * heads, atol=1e-4, rtol=0)
    assert len(res.plot().data) == 4 and res.separates
    # a model blind to the instruction: the runs agree, and the picture says so instead of dividing by ~0
    blind = planted_model()
    with torch.no_grad():
        blind.transformer.blocks[1].attn.W_O.zero_()
    same = patch_instruction(blind, clean, corrupt, answer=0, wrong=1, components=["heads"])
    assert not same.separates and "agree" in same.plot().layout.title.text


def test_batched_patching_equals_one_forward_per_patch() -> None:
    model = random_model(0)
    a, b = planted_trajs([1, 0, 1]), planted_trajs([0, 1, 1])
    clean, corrupt = windows(a, 3, ends=[3, 6, 11]), windows(b, 3, ends=[3, 6, 11])
    res = patch_instruction(
        model, clean, corrupt, answer=torch.tensor([0, 1, 2]), wrong=3, max_batch=7, step=1
    )
    tf = model.transformer
    store = {}
    names = [f"blocks.{lay}.{kind}" for lay in range(2) for kind in ("hook_resid_pre", "attn.hook_z")]
    with tf.hooks(read_hooks=[(n, lambda x, s: store.__setitem__(s.name, x)) for n in names]):
        model(*clean.inputs())

    def metric(hooks: list) -> float:
        with torch.no_grad(), tf.hooks(fwd_hooks=hooks):
            lg = model(*corrupt.inputs())[:, 1]
        return float((lg[torch.arange(3), torch.tensor([0, 1, 2])] - lg[:, 3]).mean())

    for layer in range(2):
        for pos in (0, 4, 8):
            name = f"blocks.{layer}.hook_resid_pre"

            def put(x, s, pos=pos, name=name):  # noqa: ANN001, ANN202
                x = x.clone()
                x[:, pos] = store[name][:, pos]
                return x

            assert_close(res.results["resid"].values[layer, pos], torch.tensor(metric([(name, put)])))
        for head in range(2):
            name = f"blocks.{layer}.attn.hook_z"

            def put_h(x, s, head=head, name=name):  # noqa: ANN001, ANN202
                x = x.clone()
                x[:, :, head] = store[name][:, :, head]
                return x

            assert_close(res.results["heads"].values[layer, head], torch.tensor(metric([(name, put_h)])))


def test_dla_adds_up_to_the_logits_and_names_the_carrier() -> None:
    model = planted_model()
    clean, _ = _pair(3)
    dla = action_dla(model, clean)
    assert_close(dla.sum_of_components(), dla.logits, atol=1e-5, rtol=0)
    carrier = dla.labels.index("L1H0")
    expected = torch.zeros(len(dla.labels), 7)
    expected[carrier, :2] = torch.tensor([2.0, -2.0])
    assert_close(dla.contributions, expected, atol=1e-5, rtol=0)
    assert_close(dla.difference(0, 1)[carrier], torch.tensor(4.0), atol=1e-5, rtol=0)


def test_dla_adds_up_through_a_layernorm() -> None:
    model = random_model(1)
    win = windows(planted_trajs([1, 0]), 3, ends=[2, 7])
    dla = action_dla(model, win, step=1)
    # the components at the cached final-norm scale plus the norm's and head's biases give the logits
    assert_close(dla.sum_of_components(), dla.logits, atol=1e-4, rtol=1e-4)
    assert_close(dla.logits, model(*win.inputs())[:, 1])
    assert dla.labels[:2] == ("embed", "time") and "L1 mlp" in dla.labels


def test_attention_of_the_carrier_goes_to_the_first_state() -> None:
    model = planted_model()
    clean, _ = _pair(2)
    pattern = attention_pattern(model, clean, 1, 0)
    assert_close(pattern[3 * (K - 1) + 1, 1], torch.tensor(1.0), atol=1e-6, rtol=0)
    assert_close(pattern.sum(-1), torch.ones(3 * K))
    short = windows(planted_trajs([1]), K, ends=[1])  # two real steps, two padded
    assert attention_pattern(model, short, 0, 1).shape == (6, 6)
    fig = attention_figure(model, short, 0, 1)
    assert list(fig.layout.yaxis.ticktext) == token_labels(short)[6:]
    assert fig.data[1].type == "image" and fig.data[1].source.startswith("data:image/png;base64,")
    pic = palette_obs(planted_trajs([1]).obs[0], tile_size=4)
    assert pic.shape == (28, 28, 3) and pic.dtype == np.uint8
    with pytest.raises(ValueError, match="layer 2 out of range"):
        attention_pattern(model, short, 2, 0)


def test_steering_along_the_carried_direction_flips_the_turn() -> None:
    model = planted_model()
    clean, _ = _pair(3)
    direction = torch.zeros(8)
    direction[E3] = 1.0
    res = steer(model, clean, direction, "blocks.1.hook_resid_post", -4.0)
    shift = torch.zeros(3, 7)
    shift[:, :2] = torch.tensor([-8.0, 8.0])
    assert_close(res.logits_after - res.logits_before, shift, atol=1e-5, rtol=0)
    assert res.flipped == 1.0
    assert (res.probs_before.argmax(-1) == 0).all() and (res.probs_after.argmax(-1) == 1).all()
    # steering only the action tokens cannot reach the state token's logits in the last layer
    idle = steer(model, clean, direction, "blocks.1.hook_resid_post", -4.0, kinds=["action"])
    assert_close(idle.logits_after, idle.logits_before)


# ---- labels on real MiniGrid episodes ---------------------------------------------------------------
def _memory_episodes(seeds: list[int], plan) -> Trajectories:  # noqa: ANN001 - plan(x0) -> actions
    """Episodes of MemoryS7 played by ``plan`` (given the start x) and recorded as the collectors do."""
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("minigrid")
    env = gym.make("MiniGrid-MemoryS7-v0", disable_env_checker=True)
    obs_l, act_l, rew_l, starts = [], [], [], [0]
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        for a in plan(int(env.unwrapped.agent_pos[0])):
            obs_l.append(obs["image"])
            act_l.append(a)
            obs, r, term, trunc, _ = env.step(a)
            rew_l.append(r)
            if term or trunc:
                break
        starts.append(len(act_l))
    dones = np.zeros(len(act_l), dtype=bool)
    dones[np.array(starts[1:]) - 1] = True
    return Trajectories(
        env="MiniGrid-MemoryS7-v0",
        obs=np.stack(obs_l),
        actions=np.array(act_l, dtype=np.int64),
        rewards=np.array(rew_l, dtype=np.float32),
        dones=dones,
        episode_starts=np.array(starts, dtype=np.int64),
        seeds=np.array(seeds, dtype=np.int64),
    )


def _look_back_then_walk(x0: int) -> list[int]:
    """Turn round (the instruction is behind the agent), turn back, walk to the split, turn left."""
    return [0, 0, 1, 1] + [2] * (5 - x0) + [0, 2]


def test_labels_come_from_the_seeded_layout() -> None:
    from interplab.rl.analysis import INSTRUCTION_NAMES, decision_steps, env_labels, instruction_labels

    seeds = list(range(6))
    trajs = _memory_episodes(seeds, _look_back_then_walk)
    gym = pytest.importorskip("gymnasium")
    env = gym.make("MiniGrid-MemoryS7-v0", disable_env_checker=True)
    want = []
    for seed in seeds:
        env.reset(seed=seed)
        want.append(INSTRUCTION_NAMES.index(env.unwrapped.grid.get(1, 2).type))
    assert_close(instruction_labels(trajs), torch.tensor(want).repeat_interleave(trajs.lengths))
    labels = env_labels(trajs)
    first = trajs.episode_starts[:-1]
    # left, left (facing west), right, right (east again), then forward along the corridor
    assert_close(labels.direction[first + 0], torch.zeros(len(seeds), dtype=torch.long))
    assert_close(labels.direction[first + 1], torch.full((len(seeds),), 3))
    assert_close(labels.direction[first + 2], torch.full((len(seeds),), 2))
    assert_close(labels.y[first], torch.full((len(seeds),), 3))
    # facing west in the start room, the instruction object is in view: key or ball as the label says
    inst = torch.tensor(want)
    seen_key, seen_ball = labels.key_in_view[first + 2], labels.ball_in_view[first + 2]
    assert bool((seen_ball[inst == 1]).all()) and bool((seen_key[inst == 0]).all())
    assert labels.instruction_in_view is not None and bool(labels.instruction_in_view[first + 2].all())
    starts_east = labels.x[first] > 1  # facing east from x > 1 the start-room object is behind the agent
    assert not bool(labels.instruction_in_view[first][starts_east].any())
    # the decision: at the split, facing east, after the look-back and the walk
    steps = decision_steps(trajs)
    assert_close(labels.x[steps], torch.full((len(seeds),), 5))
    assert_close(labels.direction[steps], torch.zeros(len(seeds), dtype=torch.long))
    assert_close(torch.as_tensor(trajs.actions)[steps], torch.zeros(len(seeds), dtype=torch.long))


def test_swapped_instruction_differs_only_where_the_object_is_seen() -> None:
    from interplab.rl.analysis import decision_steps, instruction_pair, swapped_instruction_obs

    trajs = _memory_episodes(list(range(6)), _look_back_then_walk)
    swapped = swapped_instruction_obs(trajs).numpy()
    recorded = trajs.obs.numpy()
    diff = (swapped != recorded).any(-1)  # steps, x, y
    changed = diff.any((1, 2))
    assert changed.any() and not changed.all()
    # where it changed, only the instruction object's object index (key <-> ball) changed
    objs = recorded[..., 0][diff]
    assert set(objs.tolist()) <= {KEY, BALL}
    assert_close(
        torch.as_tensor(swapped[..., 0][diff].astype(np.int64)),
        torch.as_tensor(KEY + BALL - objs.astype(np.int64)),
    )
    pair = instruction_pair(trajs, decision_steps(trajs), 4)
    assert_close(pair.clean.actions, pair.corrupt.actions)
    assert_close(pair.answer + pair.wrong, torch.ones(6, dtype=torch.long))


def test_a_file_of_another_env_does_not_replay() -> None:
    from interplab.rl.analysis import env_labels, instruction_labels

    trajs = _memory_episodes([0, 1], _look_back_then_walk)
    wrong_seed = dataclasses.replace(trajs, seeds=torch.tensor([5, 9]))
    with pytest.raises(ValueError, match="does not reproduce the recorded observation"):
        env_labels(wrong_seed)
    other = dataclasses.replace(trajs, env="MiniGrid-DoorKey-5x5-v0")
    with pytest.raises(ValueError, match="Memory envs"):
        instruction_labels(other)


# ---- the MemoryDT reproduction -------------------------------------------------------------------
def test_distractor_goes_to_the_nearest_empty_cell_and_is_the_other_object() -> None:
    from interplab.rl.memorydt import add_distractor

    obs = torch.full((2, 7, 7, 3), 2, dtype=torch.uint8)  # walls
    obs[:, 3, 6] = torch.tensor([1, 0, 0], dtype=torch.uint8)  # the agent's own cell is never used
    obs[0, 3, 5] = torch.tensor([1, 0, 0], dtype=torch.uint8)  # empty, in front
    obs[1, 0, 0] = torch.tensor([1, 0, 0], dtype=torch.uint8)  # empty, far corner
    out, placed = add_distractor(obs, torch.tensor([1, 0]))  # ball -> a key, key -> a ball
    assert_close(placed, torch.tensor([True, True]))
    assert_close(out[0, 3, 5], torch.tensor([KEY, 1, 0], dtype=torch.uint8))
    assert_close(out[1, 0, 0], torch.tensor([BALL, 1, 0], dtype=torch.uint8))
    changed = (out != obs).any(-1)
    assert int(changed.sum()) == 2
    walls = torch.full((1, 7, 7, 3), 2, dtype=torch.uint8)
    assert not bool(add_distractor(walls, torch.tensor([0]))[1][0])


def test_memorydt_table_on_real_episodes() -> None:
    from interplab.rl.memorydt import memorydt

    trajs = _memory_episodes(list(range(12)), _look_back_then_walk)
    model = DecisionTransformer(
        DTConfig(env="MiniGrid-MemoryS7-v0", context=4, max_timestep=245, d_model=16, n_layers=2, n_heads=2)
    )
    with torch.no_grad():  # plant the instruction feature: a key anywhere in view writes -e0, a ball +e0
        width = sum(model.cfg.obs_values)
        for cell in range(49):
            model.state_embed.weight[cell * width + KEY, E0] -= 1.0
            model.state_embed.weight[cell * width + BALL, E0] += 1.0
    table = memorydt(model, trajs, alpha=0.0)
    assert table.rows["episodes"] == 12.0
    assert table.rows["c_latent_flip_rate"] == 0.0  # a zero intervention changes nothing
    for key in ("a_probe_embedding_in_view", "b_distractor_flip_rate", "b_prediction_agreement"):
        assert 0.0 <= table.rows[key] <= 1.0
    # the planted feature makes the instruction linearly readable from the embedding where it is the only key
    # or ball in view (with both in view the planted writes cancel); both objects are among the held-out rows
    assert_close(torch.tensor(table.rows["a_probe_embedding_alone"]), torch.tensor(1.0))
    assert table.rows["a_alone_test_rows"] > 0 and table.rows["a_alone_chance"] < 1.0
    assert table.rtg_correct.shape == (5,) and bool(
        ((table.rtg_correct >= 0) & (table.rtg_correct <= 1)).all()
    )
    assert len(table.plot().data) == 5
    with pytest.raises(ValueError, match="Memory"):
        memorydt(model, dataclasses.replace(trajs, env="MiniGrid-DoorKey-5x5-v0"))
