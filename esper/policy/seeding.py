"""Seeds for policy sampling (policy §7.3): one generator per env, from (run seed, env index)."""

from esper.compute.streams import mix64

# Leading tag of the policy stream ("policy" in ASCII). Episode seeds are mix64(run, env,
# episode); without the tag, env e's policy seed would equal episode seed (run, e, k) for some k.
POLICY_STREAM = 0x706F6C696379


def policy_seed(run_seed: int, env: int) -> int:
    """The seed of env `env`'s policy sampling stream (random now, PPO's sampler later)."""
    return mix64(POLICY_STREAM, run_seed, env)
