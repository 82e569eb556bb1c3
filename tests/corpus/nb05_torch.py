# Failover corpus: a torch model and the optimizer holding its parameters; training continues.
# requires: torch

# %% torch model + SGD optimizer holding its parameters (seeded)
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
X = torch.randn(32, 3)
y = X @ torch.tensor([[1.0], [2.0], [-1.0]]) + 0.5
loss_fn = torch.nn.MSELoss()

def step():
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    return round(loss.item(), 5)

print([step() for _ in range(3)])

# %% optimizer.step() updates the model after a failover (check)
print([step() for _ in range(3)])
print(opt.param_groups[0]["params"][0] is model[0].weight)

# %% optimizer.step() still updates the model (check, again)
before = model[2].bias.detach().clone()
print(step(), bool((model[2].bias.detach() != before).any()))

# %% Adam: per-parameter state keyed by the parameters
torch.manual_seed(1)
net = torch.nn.Linear(2, 1)
adam = torch.optim.Adam(net.parameters(), lr=0.1)
xs = torch.randn(8, 2)
for _ in range(2):
    adam.zero_grad()
    net(xs).pow(2).mean().backward()
    adam.step()
print(net.weight.data, len(adam.state))

# %% Adam (check)
for _ in range(2):
    adam.zero_grad()
    net(xs).pow(2).mean().backward()
    adam.step()
print(net.weight.data, [int(s["step"]) for s in adam.state.values()])

# %% tied weights (two modules sharing one Parameter) + torch's global generator
emb = torch.nn.Embedding(5, 3)
head = torch.nn.Linear(3, 5, bias=False)
head.weight = emb.weight
torch.manual_seed(7)
print(torch.rand(2), head.weight is emb.weight)

# %% tied weights (check) + torch generator continues (check)
with torch.no_grad():
    emb.weight[0, 0] = 42.0
print(head.weight[0, 0].item(), head.weight is emb.weight)
print(torch.rand(2))

# %% module buffers (BatchNorm running stats) + train/eval mode + a tensor view
bn = torch.nn.BatchNorm1d(3)
bn(X)
bn.eval()
flat = X.view(-1)
print(bn.running_mean, bn.training)

# %% buffers (check) + tensor view (check)
X[0, 0] = 100.0
print(bn.running_mean, bn.training, flat[0].item(), flat.data_ptr() == X.data_ptr())
