"""Every surgery method against an independent numpy implementation.

The references below work on explicit flattened gradient vectors in float64
(the way the papers / LibMTL state the algorithms), never on the library's
Gram-matrix formulation, and call nothing from ``slamjax``. Inputs are random
gradient sets for T in {2, 3, 5} over a two-leaf tree (17 parameters, so the
gradients are linearly independent and every solution is unique).

Tolerance: outputs must agree to 1e-5 relative to the largest task-gradient
norm (``_assert_close``). The library runs in float32 with exact (finite)
solvers, so its error is float32 round-off (~1e-6); the references for the
iterative methods are solved to ~1e-10 in float64 (brute-force enumeration
of active sets for MGDA and UPGrad, SLSQP with ftol=1e-15 for CAGrad, a
Newton root for Nash-MTL).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from slamjax import surgery

TS = (2, 3, 5)
SEEDS = (0, 1, 2)
SHAPES = {"a": (4, 3), "b": (5,)}
TOL = 1e-5


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _random_tree(t, seed, conflict=True):
  rng = np.random.default_rng(seed)
  tree = {k: rng.normal(size=(t, *s)).astype(np.float32)
          for k, s in SHAPES.items()}
  if conflict:  # make sure some pairs conflict strongly
    tree["a"][-1] -= 1.5 * tree["a"][0]
    tree["b"][-1] -= 1.5 * tree["b"][0]
  return tree


def _flat(tree):
  """(T, P) float64 matrix J, rows = flattened task gradients."""
  t = tree["a"].shape[0]
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(t, -1)
                         for k in sorted(SHAPES)], axis=1)


def _flat_out(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1)
                         for k in sorted(SHAPES)])


def _assert_close(out, ref, j, tol=TOL):
  scale = max(1.0, float(np.max(np.linalg.norm(j, axis=1))))
  err = float(np.max(np.abs(np.asarray(out, np.float64) - ref)))
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol * scale:.3g}"


_RANDOM = ("pcgrad", "ags", "gradvac")


@functools.lru_cache(maxsize=None)
def _jitted(name, **kwargs):
  """(tx, jitted update) built once per method config (compile reuse)."""
  tx = surgery.get(name, **kwargs)
  return tx, jax.jit(tx.update)


def _run(name, tree, *, key=None, steps=1, task_weights=None, **kwargs):
  """Applies method ``name`` to ``tree``; returns (flat output, state).

  The PRNG key only enters the state, so it is set there: one compilation
  per (method, T, kwargs) serves every key. ``task_weights`` is always
  passed (ones by default) for the same reason.
  """
  t = tree["a"].shape[0]
  tx, update = _jitted(name, num_tasks=t, **kwargs)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  if name in _RANDOM:
    state = state._replace(key=jax.random.PRNGKey(0 if key is None else key))
  if task_weights is None:
    task_weights = np.ones(t, np.float32)
  for _ in range(steps):
    out, state = update(tree, state, params, task_weights=task_weights)
  return _flat_out(out), state


@functools.lru_cache(maxsize=None)
def _orders_fn(t):
  return jax.jit(lambda key: surgery.task_orders(key, t))


def _step_orders(key, t):
  """Orders the transform uses at its first update (documented convention:
  the state key is split into (next_key, step_key) on every update)."""
  _, step_key = jax.random.split(jax.random.PRNGKey(key))
  return np.asarray(_orders_fn(t)(step_key))


# ----------------------------------------------------------------------------
# numpy references (float64, parameter space).
# ----------------------------------------------------------------------------


def ref_pcgrad(j, orders):
  """Yu et al. 2020, Alg. 1: project onto normal planes of original g_j."""
  out = np.zeros(j.shape[1])
  for i in range(len(j)):
    g = j[i].copy()
    for k in orders[i]:
      d = g @ j[k]
      if d < 0:
        g = g - d / (j[k] @ j[k]) * j[k]
    out += g
  return out


def ref_gradvac(j, orders, groups, rho_t, beta):
  """Wang et al. 2021 / LibMTL GradVac; groups = list of column slices."""
  rho_t = rho_t.copy()
  pc = j.copy()
  for i in range(len(j)):
    for k in orders[i]:
      for gi, sl in enumerate(groups):
        a, b = pc[i, sl], j[k, sl]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        rho = a @ b / (na * nb)
        phi = rho_t[gi, i, k]
        if rho < phi:
          w = na * (phi * np.sqrt(1 - rho**2) - rho * np.sqrt(1 - phi**2)) / (
              nb * np.sqrt(1 - phi**2))
          pc[i, sl] = a + w * b
        rho_t[gi, i, k] = (1 - beta) * phi + beta * rho
  return pc.sum(0), rho_t


def ref_mgda(j):
  """Min-norm point of conv{g_t}: enumerate supports, exact KKT in float64."""
  t = len(j)
  g = j @ j.T
  best, best_w = np.inf, None
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      k = np.zeros((r + 1, r + 1))
      k[:r, :r], k[:r, r], k[r, :r] = g[np.ix_(s, s)], 1, 1
      sol = np.linalg.lstsq(k, np.r_[np.zeros(r), 1.0], rcond=None)[0]
      if np.all(sol[:r] >= -1e-12):
        w = np.zeros(t)
        w[s] = sol[:r]
        val = w @ g @ w
        if val < best - 1e-15:
          best, best_w = val, w
  return best_w @ j


def ref_upgrad(j, pref=None, norm_eps=1e-4, reg_eps=1e-4):
  """Quinton & Rey 2024: mean of projections of pref_i g_i on the dual cone.

  By the paper's Prop. 1 the projection of J^T u onto {x: Jx >= 0} is J^T v,
  v = argmin_{v >= u} v^T G v. Solved here by enumerating which bounds are
  active (exact KKT, float64), with torchjd's normalisation/regularisation.
  """
  t = len(j)
  g = j @ j.T
  tr = np.trace(g)
  g = g / tr if tr >= norm_eps else np.zeros_like(g)
  q = g + reg_eps * np.eye(t)
  pref = np.full(t, 1.0 / t) if pref is None else np.asarray(pref, float)
  total = np.zeros(t)
  for i in range(t):
    u = np.zeros(t)
    u[i] = pref[i]
    found = None
    for r in range(t + 1):
      for free in itertools.combinations(range(t), r):
        free = list(free)
        act = [k for k in range(t) if k not in free]
        v = u.copy()
        if free:
          v[free] = np.linalg.solve(q[np.ix_(free, free)],
                                    -q[np.ix_(free, act)] @ u[act])
        grad = q @ v
        if np.all(v[free] >= u[free] - 1e-12) and np.all(grad[act] >= -1e-12):
          found = v
          break
      if found is not None:
        break
    total += found
  return total @ j


def ref_cagrad(j, c=0.5, rescale=1):
  """Liu et al. 2021 / LibMTL CAGrad with scipy SLSQP (tight tolerance)."""
  t = len(j)
  gg = j @ j.T
  g0_norm = np.sqrt(gg.mean())
  b = np.ones(t) / t
  cc = c * g0_norm

  def obj(x):
    return x @ gg @ b + cc * np.sqrt(x @ gg @ x)

  def jac(x):
    return gg @ b + cc * (gg @ x) / np.sqrt(x @ gg @ x)

  best = None
  for x0 in [np.ones(t) / t] + list(np.eye(t) * 0.9 + 0.1 / t):
    res = scipy.optimize.minimize(
        obj, x0, jac=jac, bounds=[(0, 1)] * t, method="SLSQP",
        constraints=({"type": "eq", "fun": lambda x: 1 - x.sum(),
                      "jac": lambda x: -np.ones(t)},),
        options={"ftol": 1e-15, "maxiter": 1000})
    if best is None or res.fun < best.fun:
      best = res
  gw = best.x @ j
  g = j.mean(0) + cc / np.linalg.norm(gw) * gw
  return g / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]


def ref_imtl_g_weights(j):
  """Liu et al. 2021 (IMTL-G) closed form: a_{2:T} = g_1 U^T (D U^T)^-1."""
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  d = j[:1] - j[1:]
  uu = u[:1] - u[1:]
  a = j[0] @ uu.T @ np.linalg.inv(d @ uu.T)
  return np.r_[1 - a.sum(), a]


def ref_imtl_g(j):
  return ref_imtl_g_weights(j) @ j


def ref_aligned_mtl(j, pref=None):
  """Senushkin et al. 2023: SVD J^T = U S V^T, out = s_min U V^T pref."""
  t = len(j)
  pref = np.ones(t) if pref is None else np.asarray(pref, float)
  u, s, vt = np.linalg.svd(j.T, full_matrices=False)
  return s.min() * u @ vt @ pref


def ref_nash_mtl(j):
  """Navon et al. 2022: alpha > 0 with G_n alpha = 1/alpha, G_n = G/||G||_F."""
  g = j @ j.T
  g = g / np.linalg.norm(g)
  sol = scipy.optimize.root(lambda a: g @ a - 1 / a,
                            1 / np.sqrt(np.diag(g)), tol=1e-13)
  assert np.all(sol.x > 0)
  assert np.max(np.abs(g @ sol.x - 1 / sol.x)) < 1e-10
  return sol.x @ j


# ----------------------------------------------------------------------------
# Comparisons.
# ----------------------------------------------------------------------------

# name -> (kwargs, reference(J) or None if it needs orders)
DETERMINISTIC = {
    "sum": ({}, lambda j: j.sum(0)),
    "mean": ({}, lambda j: j.mean(0)),
    "mgda": ({}, ref_mgda),
    "upgrad": ({}, ref_upgrad),
    "cagrad": ({}, ref_cagrad),
    "imtl_g": ({}, ref_imtl_g),
    "aligned_mtl": ({}, ref_aligned_mtl),
    "nash_mtl": ({}, ref_nash_mtl),
}


def _check_weights(state, tree, out):
  """state.weights are exact: out = sum_t w_t g_t."""
  j = _flat(tree)
  _assert_close(out, np.asarray(state.weights, np.float64) @ j, j)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_match_reference(name, t):
  kwargs, ref = DETERMINISTIC[name]
  for seed in SEEDS:
    tree = _random_tree(t, seed)
    j = _flat(tree)
    out, state = _run(name, tree, **kwargs)
    _assert_close(out, ref(j), j)
    _check_weights(state, tree, out)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("name", ["pcgrad", "ags"])
def test_pcgrad_matches_reference(name, t):
  for seed in SEEDS:
    tree = _random_tree(t, seed)
    j = _flat(tree)
    out, state = _run(name, tree, key=seed)
    ref = ref_pcgrad(j, _step_orders(seed, t))
    if name == "ags":
      ref = ref * np.linalg.norm(j.sum(0)) / np.linalg.norm(ref)
    _assert_close(out, ref, j)
    _check_weights(state, tree, out)


def test_pcgrad_fixed_order_matches_reference():
  tree = _random_tree(3, 7)
  j = _flat(tree)
  out, _ = _run("pcgrad", tree, shuffle=False)
  orders = [[k for k in range(3) if k != i] for i in range(3)]
  _assert_close(out, ref_pcgrad(j, orders), j)


@pytest.mark.parametrize("granularity,ts", [("model", TS), ("leaf", (3,))])
def test_gradvac_matches_reference_over_steps(granularity, ts):
  """Three consecutive steps (EMA targets carried in the optax state)."""
  beta = 0.5
  for t in ts:
    tree0 = _random_tree(t, 10 + t)
    tx, update = _jitted("gradvac", num_tasks=t, beta=beta,
                         granularity=granularity)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = tx.init(params)._replace(key=jax.random.PRNGKey(3))
    update = functools.partial(update, task_weights=np.ones(t, np.float32))
    if granularity == "model":
      groups = [slice(None)]
    else:  # one group per leaf, in tree-flatten order ('a' then 'b')
      groups = [slice(0, 12), slice(12, 17)]
    rho = np.zeros((len(groups), t, t))
    key = jax.random.PRNGKey(3)
    for step in range(3):
      tree = jax.tree.map(lambda x: x * (1 + step) + step * 0.3, tree0)
      if step == 2:  # a new conflict pattern
        tree = _random_tree(t, 20 + t)
      key, step_key = jax.random.split(key)
      orders = np.asarray(_orders_fn(t)(step_key))
      out, state = update(tree, state, params)
      ref, rho = ref_gradvac(_flat(tree), orders, groups, rho, beta)
      _assert_close(_flat_out(out), ref, _flat(tree))
      np.testing.assert_allclose(np.asarray(state.inner), rho, atol=1e-5)
      if granularity == "model":
        _check_weights(state, tree, _flat_out(out))


def test_gradvac_first_step_equals_pcgrad():
  tree = _random_tree(3, 4)
  out_gv, _ = _run("gradvac", tree, key=5, **ALL["gradvac"])
  out_pc, _ = _run("pcgrad", tree, key=5)
  _assert_close(out_gv, out_pc, _flat(tree))


def test_cagrad_other_settings_match_reference():
  tree = _random_tree(3, 11)
  j = _flat(tree)
  for c, rescale in [(0.9, 2)]:
    out, state = _run("cagrad", tree, c=c, rescale=rescale)
    _assert_close(out, ref_cagrad(j, c, rescale), j)
    _check_weights(state, tree, out)


def test_upgrad_equals_pcgrad_for_two_tasks():
  """torchjd's equivalence: UPGrad(pref=1, no normalisation) == PCGrad, T=2."""
  for seed in SEEDS:
    tree = _random_tree(2, seed)
    j = _flat(tree)
    up, _ = _run("upgrad", tree, pref=(1.0, 1.0), norm_eps=0.0, reg_eps=0.0)
    _assert_close(up, ref_upgrad(j, (1.0, 1.0), 0.0, 0.0), j)
    pc, _ = _run("pcgrad", tree, key=seed)
    _assert_close(up, pc, j)


def test_task_weights_prescale_tasks():
  """task_weights=c gives the method's result on the gradients c_t g_t."""
  c = np.array([0.5, 2.0, 1.0], np.float32)
  tree = _random_tree(3, 13)
  scaled = jax.tree.map(lambda x: x * c.reshape(3, *[1] * (x.ndim - 1)), tree)
  for name, kw in [("mgda", {}), ("pcgrad", {"key": 1}), ("sum", {}),
                   ("cagrad", {})]:
    out_w, st = _run(name, tree, task_weights=c, **kw)
    out_s, _ = _run(name, scaled, **kw)
    _assert_close(out_w, out_s, _flat(scaled))
    _check_weights(st, tree, out_w)


# ----------------------------------------------------------------------------
# Properties (reusing the compiled functions above).
# ----------------------------------------------------------------------------

ALL = {"sum": {}, "mean": {}, "pcgrad": {}, "ags": {},
       "gradvac": {"beta": 0.5, "granularity": "model"},
       "cagrad": {}, "mgda": {}, "imtl_g": {}, "aligned_mtl": {},
       "upgrad": {}, "nash_mtl": {}}
PERMUTATION_INVARIANT = ["sum", "mean", "cagrad", "mgda", "imtl_g",
                         "aligned_mtl", "upgrad", "nash_mtl"]


def _tree_from_matrix(j):
  """Embeds a (T, <=17) matrix into the test tree (zero padded)."""
  t = len(j)
  full = np.zeros((t, 17), np.float32)
  full[:, :j.shape[1]] = j
  return {"a": full[:, :12].reshape(t, 4, 3), "b": full[:, 12:]}


@pytest.mark.parametrize("name,ts", [("mgda", TS), ("upgrad", TS),
                                     ("pcgrad", (2,)), ("ags", (2,))])
def test_result_does_not_conflict_with_any_task(name, ts):
  for t in ts:
    for seed in range(6):
      tree = _random_tree(t, 100 + seed)
      j = _flat(tree)
      out, state = _run(name, tree, **ALL[name])
      dots = j @ out
      tol = 1e-5 * np.max(np.sum(j * j, axis=1))
      if name == "upgrad":  # the reg_eps ridge (doc): -reg_eps tr(G) max(v)
        v = np.asarray(state.weights)
        tol += 1e-4 * np.trace(j @ j.T) * np.max(np.abs(v))
      assert np.all(dots >= -tol), (t, seed, dots)


def test_pcgrad_can_conflict_for_three_tasks():
  """PCGrad's no-conflict guarantee is for T = 2 only (documented)."""
  j = np.array([[0.0, 3.0], [-2.0, 2.0], [1.0, -3.0]])
  out, _ = _run("pcgrad", _tree_from_matrix(j), shuffle=False)
  _assert_close(out[:2], np.array([0.2, 0.4]), j)
  assert (j @ out[:2])[2] < -0.9


@pytest.mark.parametrize("t", TS)
def test_ags_output_norm_equals_plain_sum_norm(t):
  for seed in range(4):
    tree = _random_tree(t, 200 + seed)
    j = _flat(tree)
    out, state = _run("ags", tree, key=seed)
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(j.sum(0)),
                               rtol=1e-5)
    np.testing.assert_allclose(state.norm_ratio, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariance(name):
  tree = _random_tree(3, 300)
  perm = np.array([2, 0, 1])
  permuted = jax.tree.map(lambda x: x[perm], tree)
  out, st = _run(name, tree, **ALL[name])
  out_p, st_p = _run(name, permuted, **ALL[name])
  _assert_close(out_p, out, _flat(tree))
  np.testing.assert_allclose(np.asarray(st_p.weights),
                             np.asarray(st.weights)[perm], atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_positive_homogeneity_and_degenerate_inputs(name):
  """out(a g) = a out(g); zero / identical / opposite gradients stay finite."""
  tree = _random_tree(3, 400)
  out, _ = _run(name, tree, **ALL[name])
  out2, _ = _run(name, jax.tree.map(lambda x: 3.0 * x, tree), **ALL[name])
  _assert_close(out2, 3.0 * out, 3.0 * _flat(tree))
  g = _random_tree(1, 401, conflict=False)
  cases = {
      "zero": jax.tree.map(lambda x: np.zeros((3, *x.shape[1:]), np.float32),
                           g),
      "identical": jax.tree.map(lambda x: np.repeat(x, 3, axis=0), g),
      "one_zero": jax.tree.map(
          lambda x, y: np.concatenate([x[:2], np.zeros_like(x[:1])]), tree, g),
      "opposite": jax.tree.map(
          lambda x: np.concatenate([x, -x, 2 * x]), g),
  }
  for case, grads in cases.items():
    out, state = _run(name, grads, **ALL[name])
    assert np.all(np.isfinite(out)), (name, case)
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (name, case)
    if case == "zero":
      np.testing.assert_array_equal(out, 0.0)
    if case == "identical" and name not in ("nash_mtl",):
      # every method returns a non-negative multiple of the common gradient
      gv = _flat_out(jax.tree.map(lambda x: x[0], g))
      coef = out @ gv / (gv @ gv)
      _assert_close(out, coef * gv, _flat(grads))
      assert coef >= 0


# ----------------------------------------------------------------------------
# IMTL-G near opposite gradients (regression: a pseudo-inverse of G dropped
# its small eigenvalue there and returned huge updates).
# ----------------------------------------------------------------------------

IMTL_NEAR_OPPOSITE = {
    "collinear_opposite": [[1.0, 0.0], [-0.4, 0.0]],
    "near_opposite": [[1.6022, 6e-4], [-1.5911, 2.3e-3]],
    "near_opposite_t3": [[1.3, 2e-4, 0.0], [-0.9, 1e-3, 0.0],
                         [0.3, 0.5, 0.8]],
    "near_opposite_t3_flat": [[1.3, 2e-4, 0.0], [-0.9, 1e-3, 0.0],
                              [0.3, 0.5, -1e-3]],
}


@pytest.mark.parametrize("case", sorted(IMTL_NEAR_OPPOSITE))
def test_imtl_g_near_opposite_matches_closed_form(case):
  tree = _tree_from_matrix(np.array(IMTL_NEAR_OPPOSITE[case]))
  j = _flat(tree)   # float32-rounded inputs, float64 reference
  out, state = _run("imtl_g", tree)
  alpha = ref_imtl_g_weights(j)
  np.testing.assert_allclose(np.asarray(state.weights), alpha, atol=1e-5)
  _assert_close(out, alpha @ j, j)
  _check_weights(state, tree, out)
  # The defining property: equal projections on every unit task direction.
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  proj = u @ out
  assert np.ptp(proj) <= 1e-5 * np.max(np.linalg.norm(j, axis=1)), proj


def test_imtl_g_collinear_opposite_values():
  """g2 = -0.4 g1: equal projections on u and -u force out = 0."""
  out, state = _run("imtl_g", _tree_from_matrix(np.array(
      IMTL_NEAR_OPPOSITE["collinear_opposite"])))
  np.testing.assert_allclose(np.asarray(state.weights), [2 / 7, 5 / 7],
                             atol=1e-6)
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


@pytest.mark.parametrize("t", (2, 3))
def test_imtl_g_angle_sweep_towards_180_degrees(t):
  """Task 2 at 180 deg - delta from task 1 (other norms, a generic task 3)."""
  rng = np.random.default_rng(7)
  for delta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
    j = np.zeros((t, 17))
    j[0, :2] = [1.7, 0.0]
    j[1, :2] = 0.6 * np.array([-np.cos(delta), np.sin(delta)])
    if t == 3:
      j[2] = rng.normal(size=17)
    tree = _tree_from_matrix(j)
    j = _flat(tree)
    out, state = _run("imtl_g", tree)
    alpha = ref_imtl_g_weights(j)
    assert np.all(np.abs(np.asarray(state.weights)) < 10), (delta, alpha)
    np.testing.assert_allclose(np.asarray(state.weights), alpha, atol=1e-4)
    _assert_close(out, alpha @ j, j)
