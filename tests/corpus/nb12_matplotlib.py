# Failover corpus: a matplotlib figure and its axes (fig, ax pair) and pyplot's current figure.
# requires: matplotlib

# %% fig, ax pair (Agg backend, nothing displayed)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
line, = ax.plot([1, 2, 3], [1, 4, 9])
print(ax.figure is fig, len(ax.lines))

# %% fig, ax (check): drawing on ax changes fig
ax.set_title("squares")
ax.plot([1, 2, 3], [1, 2, 3])
print(fig.axes[0].get_title(), len(fig.axes[0].lines), line in ax.lines)

# %% pyplot state: the current figure and rcParams
plt.rcParams["lines.linewidth"] = 3.5
print(plt.gcf() is fig, plt.rcParams["lines.linewidth"])

# %% pyplot state (check)
print(plt.gcf() is fig, plt.rcParams["lines.linewidth"], plt.get_fignums())
