"""The jupyter_client kernel provisioner ``nbcluster-provisioner`` (entry point
``jupyter_client.kernel_provisioners``): kernelspecs whose kernels run on an nbcluster
gateway, picked per kernelspec beside local kernels in any jupyter_client tool
(``docs/provisioner.md``)."""

from ._config import ProvisionerConfig, ProvisionerConfigError
from ._gateway import GatewayApi, GatewayCallError, RemoteKernel
from ._provisioner import NbclusterProvisioner

__all__ = [
    "GatewayApi",
    "GatewayCallError",
    "NbclusterProvisioner",
    "ProvisionerConfig",
    "ProvisionerConfigError",
    "RemoteKernel",
]
