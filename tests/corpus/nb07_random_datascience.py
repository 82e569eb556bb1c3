# Failover corpus: seeded global generators continue the same sequence; plain numeric code.
# requires: numpy

# %% random.seed (global generator) + np.random.seed (legacy global generator) + generator objects
import random
import numpy as np
random.seed(1234)
np.random.seed(42)
rng = np.random.default_rng(0)
own = random.Random(99)
data = rng.normal(size=(200, 3))
print(random.random(), np.random.rand(), own.random(), data.shape)

# %% random, np.random, generator objects (check): the sequences continue
print(random.random(), random.randint(0, 10**6), random.choice("abcdef"))
print(np.random.rand(3), np.random.randint(0, 100, size=4))
print(own.random(), rng.normal(size=2), rng.integers(0, 10, size=3))

# %% data-science style: statistics, normalisation, regression, results built in a loop
means = data.mean(axis=0)
norm = (data - means) / data.std(axis=0)
cov = np.cov(norm.T)
w_true = np.array([1.5, -2.0, 0.5])
target = data @ w_true + 0.01 * rng.normal(size=200)
coef = np.linalg.lstsq(data, target, rcond=None)[0]

def zscore(v):
    return (v - v.mean()) / v.std()

results = {}
for name, col in zip(["a", "b", "c"], data.T):
    results[name] = {"z_max": float(zscore(col).max().round(4)), "n": len(col)}
print(means.round(3), coef.round(2), results)

# %% data-science (check)
residual = target - data @ coef
print(cov.round(2), float(np.abs(residual).max().round(3)), norm.std(axis=0).round(6))
results["d"] = {"z_max": float(zscore(data[:, 0] * 2).max().round(4)), "n": 200}
print(sorted(results), results["a"] == results["d"])

# %% collections (defaultdict with a lambda factory, Counter, deque, OrderedDict) + structured and masked arrays
import collections
groups = collections.defaultdict(lambda: [0])
for i, v in enumerate("abcabca"):
    groups[v].append(i)
counts = collections.Counter("mississippi")
window = collections.deque(range(5), maxlen=3)
ordered = collections.OrderedDict(z=1, a=2)
ordered.move_to_end("z")
rec = np.zeros(3, dtype=[("x", "i4"), ("y", "f8")])
rec["x"] = [1, 2, 3]
masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0])
print(dict(groups), counts.most_common(2), window, list(ordered), rec, masked.sum())

# %% collections (check) + structured/masked arrays (check)
groups["new"].append(9)
window.append(99)
print(dict(groups), counts["s"], window, list(ordered))
rec["y"] += 0.5
print(rec, masked, masked.mask)
