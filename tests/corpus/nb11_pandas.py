# Failover corpus: a pandas DataFrame and objects that keep a reference to it.
# requires: pandas

# %% DataFrame + a groupby object that refers to the frame
import pandas as pd
df = pd.DataFrame({"k": ["a", "b", "a", "c"], "v": [1, 2, 3, 4]})
grouped = df.groupby("k")
col = df["v"]
print(grouped["v"].sum().to_dict())

# %% groupby and its frame (check): a change to the frame shows through the groupby
df.loc[0, "v"] = 100
print(grouped["v"].sum().to_dict(), grouped.obj is df)

# %% pandas options (interpreter-like state) + categorical and datetime columns
pd.set_option("display.max_rows", 5)
df["when"] = pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"])
df["cat"] = df["k"].astype("category")
print(pd.get_option("display.max_rows"), df.dtypes.astype(str).to_dict())

# %% options (check) + dtypes (check)
print(pd.get_option("display.max_rows"), df["cat"].cat.categories.tolist(), df["when"].dt.day.tolist())

# %% pivot and a derived frame
summary = df.pivot_table(index="k", values="v", aggfunc="sum")
print(summary)

# %% derived frame (check)
print(summary.loc["a", "v"], len(df), df.index.tolist())
