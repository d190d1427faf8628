"""Specification of your own env: `gym:<id>` and `envs.register(name, factory)` (docs/own-env.md)."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.dmc import resize_render
from envs.toy import ToyReach

ROOT = Path(__file__).resolve().parent.parent


class Blank(gym.Env):
    """A black image of the requested kind; remembers the actions it was given."""

    def __init__(self, image_size=64, action_space=None, shape=None, dtype=np.uint8,
                 reset_dtype=None):
        self.observation_space = gym.spaces.Box(0, 255, shape or (3, image_size, image_size), dtype)
        self.action_space = action_space or gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.reset_dtype, self.actions = reset_dtype or dtype, []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(self.observation_space.shape, self.reset_dtype), {}

    def step(self, action):
        self.actions.append(action)
        return np.zeros(self.observation_space.shape, self.observation_space.dtype), 1.0, False, False, {}


class TextOnly(Blank):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, render_mode=None):
        super().__init__()
        self.render_mode = render_mode


gym.register("EnvsTestTextOnly-v0", entry_point=TextOnly)
gym.register("EnvsTestNoRenderMode-v0", entry_point=Blank)  # its constructor takes no render_mode


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test registers its own names into an empty registry."""
    monkeypatch.setattr(envs, "REGISTERED", {})


def pixels(frame, size):
    return resize_render(frame, size).transpose(2, 0, 1)


def docs_launcher(folder: Path) -> Path:
    """docs/own-env.md's `my_env.py`, written to `folder`."""
    text = (ROOT / "docs" / "own-env.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# my_env.py")]
    path = folder / "my_env.py"
    path.write_text(block)
    return path


# --- gym:<id> ------------------------------------------------------------------------------------

def test_gym_id_observes_its_resized_render_and_rescales_box_actions():
    env = envs.make("gym:Pendulum-v1", image_size=48, seed=3, action_repeat=3)
    raw = gym.make("Pendulum-v1", render_mode="rgb_array")
    try:
        assert env.observation_space == gym.spaces.Box(0, 255, (3, 48, 48), np.uint8)
        assert env.action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        obs, info = env.reset()
        raw.reset(seed=3)
        assert info["env_steps"] == 0 and obs.dtype == np.uint8
        np.testing.assert_array_equal(obs, pixels(raw.render(), 48))
        obs, reward, terminated, truncated, info = env.step(np.array([0.5]))
        # 0.5 in [-1, 1] is a torque of 1.0 in Pendulum's [-2, 2]; rewards summed over the repeat
        expected = sum(raw.step(np.array([1.0], np.float32))[1] for _ in range(3))
        assert info["env_steps"] == 3 and reward == pytest.approx(expected)
        assert not terminated and not truncated
        np.testing.assert_array_equal(obs, pixels(raw.render(), 48))
        np.testing.assert_array_equal(env.render(), obs.transpose(1, 2, 0))
    finally:
        env.close()
        raw.close()


def test_gym_id_keeps_discrete_actions():
    env = envs.make("gym:CartPole-v1", seed=0, image_size=32)
    raw = gym.make("CartPole-v1")
    try:
        assert env.action_space == gym.spaces.Discrete(2)
        env.reset()
        raw.reset(seed=0)
        for action in (1, 1, 0):
            env.step(action)
            raw.step(action)
        np.testing.assert_array_equal(env.unwrapped.state, raw.unwrapped.state)
        with pytest.raises(ValueError, match=r"action must be an int in \[0, 2\)"):
            env.step(2)
    finally:
        env.close()
        raw.close()


def test_gym_id_same_seed_replays_and_seeds_differ():
    def episode(seed, reseed=None):
        env = envs.make("gym:Pendulum-v1", seed=seed, image_size=32)
        try:
            frames = [env.reset(seed=reseed)[0]]
            frames += [env.step(np.array([a]))[0] for a in (1.0, -1.0, 0.3)]
            return np.stack(frames)
        finally:
            env.close()

    np.testing.assert_array_equal(episode(0), episode(0))
    assert not np.array_equal(episode(0), episode(1))
    np.testing.assert_array_equal(episode(1, reseed=0), episode(0))  # reset(seed=) wins


def test_gym_id_time_limit_replaces_its_own_and_counts_simulator_steps():
    env = envs.make("gym:Pendulum-v1", time_limit=10, action_repeat=3, image_size=16)
    try:
        env.reset()
        steps = [env.step(np.zeros(1)) for _ in range(4)]
        assert [info["env_steps"] for *_, info in steps] == [3, 3, 3, 1]
        assert [truncated for *_, truncated, _ in steps] == [False, False, False, True]
    finally:
        env.close()


def test_gym_id_defaults_to_action_repeat_1_and_no_videos():
    assert envs.default_action_repeat("gym:Pendulum-v1") == 1
    assert envs.video_source("gym:Pendulum-v1", "none", "/some/videos") == "none"
    env = envs.make("gym:Pendulum-v1", image_size=16)
    try:
        env.reset()
        assert env.step(np.zeros(1))[-1]["env_steps"] == 1
    finally:
        env.close()


@pytest.mark.parametrize("env_id,kwargs,message", [
    ("gym:Foo-v9", {}, r"unknown env 'gym:Foo-v9' \(Gymnasium: Environment `Foo` doesn't exist\); "
                       r"gym:<id> takes a registered Gymnasium id such as gym:CartPole-v1"),
    ("gym:CartPol-v1", {}, r"unknown env 'gym:CartPol-v1' \(did you mean 'gym:CartPole-v1'\?\)"),
    ("gym:envs_no_such_module:Foo-v0", {},
     r"cannot make env 'gym:envs_no_such_module:Foo-v0': No module named 'envs_no_such_module'"),
    ("gym:EnvsTestTextOnly-v0", {}, r"cannot render rgb_array images \(its render modes: ansi\); "
                                    r"envs needs pixels: .*envs.register"),
    ("gym:EnvsTestNoRenderMode-v0", {}, r"'gym:EnvsTestNoRenderMode-v0' cannot render rgb_array"),
    ("gym:CartPole-v1", dict(distraction="easy"),
     r"unknown distraction 'easy' for 'gym:CartPole-v1'; 'easy' is for dcs-\* envs; gym:<id> takes: none"),
    ("gym:CartPole-v1", dict(render_shape=(60, 80)), r"render_shape is for dmc-\*"),
])
def test_gym_id_mistakes_get_one_line_without_gymnasium_traceback(env_id, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        envs.make(env_id, **kwargs)
    assert "\n" not in str(error.value)
    # nothing of gymnasium's chained: a script prints this line alone
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__


def test_script_given_an_unknown_gym_id_says_error_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "dreamerv2.py"), "--env", "gym:Foo-v9",
                          "--preset", "tiny"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown env 'gym:Foo-v9'"), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def test_classic_control_renders_without_a_display_and_without_sdl_noise():
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER", "SDL_AUDIODRIVER")}
    code = ("import envs; e = envs.make('gym:CartPole-v1', image_size=32); o, _ = e.reset(); "
            "e.step(0); print(o.shape, o.std() > 0); e.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(env, MUJOCO_GL="egl", PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "(3, 32, 32) True"
    assert "XDG_RUNTIME_DIR" not in out.stderr and "ALSA" not in out.stderr, out.stderr


# --- envs.register -------------------------------------------------------------------------------

def test_registered_env_gets_the_contract_and_its_default_action_repeat():
    envs.register("my-reach", ToyReach, action_repeat=3)
    assert envs.default_action_repeat("my-reach") == 3
    env = envs.make("my-reach", seed=1, image_size=32)
    plain = ToyReach(seed=1, image_size=32)
    obs, info = env.reset()
    np.testing.assert_array_equal(obs, plain.reset()[0])
    obs, reward, _, _, info = env.step(np.array([1.0, -0.5]))
    expected = sum(plain.step(np.array([1.0, -0.5]))[1] for _ in range(3))
    assert info["env_steps"] == 3 and reward == pytest.approx(expected)
    np.testing.assert_array_equal(obs, plain._render())
    once = envs.make("my-reach", action_repeat=1, image_size=32)  # make's argument wins
    once.reset()
    assert once.step(np.zeros(2))[-1]["env_steps"] == 1


def test_registered_factory_gets_the_arguments_it_names():
    calls = []

    def named(seed, image_size):
        calls.append(dict(seed=seed, image_size=image_size))
        return Blank(image_size)

    def anything(**kwargs):
        calls.append(kwargs)
        return Blank(kwargs["image_size"])

    envs.register("named", named)
    envs.register("anything", anything)
    common = dict(seed=5, image_size=32, dynamic=False, split="val")
    envs.make("named", **common, video_dir="/videos", time_limit=9)
    envs.make("anything", **common)
    envs.make("anything", **common, video_dir="/videos", time_limit=9)
    assert calls[0] == dict(seed=5, image_size=32)
    assert calls[1] == dict(seed=5, image_size=32, distraction="none", dynamic=False, split="val")
    assert calls[2] == dict(calls[1], video_dir="/videos", time_limit=9)


def test_registered_box_actions_are_rescaled_and_discrete_numbered_from_0():
    box = gym.spaces.Box(np.array([0, -5], np.float32), np.array([10, 5], np.float32))
    envs.register("wide-box", lambda image_size: Blank(image_size, action_space=box))
    envs.register("shifted", lambda image_size: Blank(image_size, gym.spaces.Discrete(3, start=-1)))
    env = envs.make("wide-box", image_size=16)
    env.reset()
    env.step(np.array([-1.0, 1.0]))
    env.step(np.array([0.0, 0.0]))
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    np.testing.assert_allclose(env.unwrapped.actions, [[0.0, 5.0], [5.0, 0.0]])
    env = envs.make("shifted", image_size=16)
    env.reset()
    env.step(0)
    env.step(2)
    assert env.action_space == gym.spaces.Discrete(3) and env.unwrapped.actions == [-1, 1]


def test_registered_time_limit_wraps_a_factory_without_one():
    envs.register("endless", lambda image_size: Blank(image_size))
    env = envs.make("endless", time_limit=4, action_repeat=3, image_size=16)
    env.reset()
    steps = [env.step(np.zeros(2)) for _ in range(2)]
    assert [info["env_steps"] for *_, info in steps] == [3, 1]
    assert [truncated for *_, truncated, _ in steps] == [False, True]


def test_registered_distraction_reaches_a_factory_that_takes_one():
    seen = []

    def tinted(image_size, distraction="none"):
        seen.append(distraction)
        return Blank(image_size)

    envs.register("tinted", tinted)
    envs.register("plain", lambda image_size: Blank(image_size))
    envs.make("tinted", distraction="blue", image_size=16)
    assert seen == ["blue"]
    with pytest.raises(ValueError, match="unknown distraction 'blue' for 'plain': its factory "
                                         "takes no distraction argument, so only 'none'"):
        envs.make("plain", distraction="blue")


def test_registered_video_source_is_the_video_dir_only_if_the_factory_takes_one():
    envs.register("with-videos", lambda image_size, video_dir=None: Blank(image_size))
    envs.register("no-videos", lambda image_size: Blank(image_size))
    assert envs.video_source("with-videos", "none", "/my/videos") == "/my/videos"
    assert envs.video_source("with-videos", "none", None) == "none"
    assert envs.video_source("no-videos", "none", "/my/videos") == "none"
    assert envs.default_action_repeat("no-videos") == 1


@pytest.mark.parametrize("factory,message", [
    (lambda image_size: Blank(image_size + 1),
     r"env 'mine' has observation_space Box\(0, 255, \(3, 65, 65\), uint8\); envs needs "
     r"Box\(0, 255, \(3, 64, 64\), uint8\): channels first, image_size=64"),
    (lambda: Blank(shape=(64, 64, 3)), r"observation_space Box\(0, 255, \(64, 64, 3\), uint8\)"),
    (lambda: Blank(dtype=np.float32), r"observation_space Box\(0.0, 255.0, \(3, 64, 64\), float32\)"),
    (lambda: Blank(action_space=gym.spaces.MultiDiscrete([2, 2])),
     r"action_space MultiDiscrete\(\[2 2\]\); envs needs a Box or Discrete one"),
    (lambda: Blank(action_space=gym.spaces.Box(-np.inf, np.inf, (2,))),
     r"envs needs a one-dimensional Box with finite bounds"),
    (lambda: Blank(action_space=gym.spaces.Box(-1, 1, (2, 2))), r"one-dimensional Box"),
    (lambda: "an env", r"the factory registered as 'mine' returned type str, not a gymnasium.Env"),
])
def test_registered_env_with_wrong_spaces_is_refused_in_one_line(factory, message):
    envs.register("mine", factory)
    with pytest.raises(ValueError, match=message) as error:
        envs.make("mine")
    assert "\n" not in str(error.value)


def test_registered_env_whose_reset_breaks_its_observation_space_is_refused():
    envs.register("liar", lambda image_size: Blank(image_size, reset_dtype=np.float32))
    env = envs.make("liar")
    with pytest.raises(ValueError, match=r"env 'liar' returned a float32 \(3, 64, 64\) observation "
                                         r"at reset; its observation_space says uint8"):
        env.reset()


@pytest.mark.parametrize("name,factory,kwargs,message", [
    ("dmc-mine", ToyReach, {}, r"cannot register 'dmc-mine': it collides with the built-in "
                               r"dmc-\* family; choose a name that does not start with dmc-, dcs-"),
    ("toy", ToyReach, {}, r"collides with the built-in toy-\* family"),
    ("gym:Mine-v0", ToyReach, {}, r"a name is letters, digits, '-', '_' and '.'"),
    ("my env", ToyReach, {}, r"a name is letters, digits"),
    ("", ToyReach, {}, r"a name is letters, digits"),
    ("mine", "ToyReach", {}, r"the factory must be callable, got str"),
    ("mine", ToyReach, dict(action_repeat=0), r"action_repeat must be an int >= 1, got 0"),
])
def test_register_refuses_bad_names_factories_and_repeats(name, factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.register(name, factory, **kwargs)
    assert envs.REGISTERED == {}


def test_registering_a_name_again_replaces_its_factory():
    envs.register("again", lambda image_size: Blank(image_size))
    envs.register("again", ToyReach, action_repeat=2)
    assert envs.make("again").unwrapped.__class__ is ToyReach
    assert envs.default_action_repeat("again") == 2


def test_unknown_env_names_the_gym_form_and_registered_names():
    with pytest.raises(ValueError, match=r"known: dmc-.*gym:<gymnasium id>, or a name given to "
                                         r"envs.register \(registered: none yet\)"):
        envs.make("nope")
    envs.register("my-dot", ToyReach)
    with pytest.raises(ValueError, match=r"unknown env 'my-dt' \(did you mean 'my-dot'\?\); "
                                         r"known: .*\(registered: my-dot\)"):
        envs.make("my-dt")
    with pytest.raises(ValueError, match=r"unknown env family 'atari'.*registered: my-dot"):
        envs.make("atari-pong")
    envs.register("my-cartpole-balance", ToyReach)  # close to a built-in id, which still works
    env = envs.make("dmc-cartpole-balance", image_size=16)
    assert env.action_space.shape == (1,)
    env.close()


# --- the docs' launcher, end to end --------------------------------------------------------------

def test_docs_dot_env_is_seeded_by_make_without_a_seed_argument(tmp_path):
    runpy.run_path(str(docs_launcher(tmp_path)))  # not __main__: registers "dot" only

    def first_frames(seed):
        env = envs.make("dot", seed=seed)
        return np.stack([env.reset()[0], env.step(np.ones(2))[0]])

    assert envs.default_action_repeat("dot") == 1
    np.testing.assert_array_equal(first_frames(4), first_frames(4))
    assert not np.array_equal(first_frames(4), first_frames(5))
    assert first_frames(4).max() == 255  # the dot is drawn


def run_tiny_dreamerv2(cwd: Path, *command: str) -> Path:
    """`python *command` with dreamerv2's tiny preset for 300 env steps in `cwd`; its run folder."""
    flags = ["--preset", "tiny", "--total-steps", "300", "--eval-every", "0", "--eval-episodes", "1",
             "--seed", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    out = subprocess.run([sys.executable, *command, *flags], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics,) = cwd.glob("runs/*/metrics.jsonl")
    assert any('"eval/episodic_return"' in line for line in metrics.read_text().splitlines())
    return metrics.parent


def test_docs_launcher_trains_dreamerv2_on_a_registered_env(tmp_path):
    launcher = docs_launcher(tmp_path)
    run_dir = run_tiny_dreamerv2(tmp_path, str(launcher), str(ROOT / "dreamerv2.py"), "--env", "dot")
    assert run_dir.name.startswith("dot__")


def test_dreamerv2_trains_on_a_gym_id(tmp_path):
    run_dir = run_tiny_dreamerv2(tmp_path, str(ROOT / "dreamerv2.py"), "--env", "gym:Pendulum-v1")
    assert run_dir.name.startswith("gym-Pendulum-v1__")  # no colon: TensorBoard's name:path


def test_speed_table_keeps_the_colons_of_gym_ids():
    from envs.speed import parse_case

    assert parse_case("gym:CartPole-v1") == ("gym:CartPole-v1", "none")
    assert parse_case("gym:minigrid:MiniGrid-Empty-5x5-v0") == ("gym:minigrid:MiniGrid-Empty-5x5-v0", "none")
    assert parse_case("dcs-walker-walk:hard") == ("dcs-walker-walk", "hard")
