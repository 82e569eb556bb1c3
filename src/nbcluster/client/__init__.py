"""An async client for the gateway: REST (:class:`GatewayClient`) and channels
(:class:`KernelChannels`)."""

from ._channels import ExecutionResult, KernelChannels
from ._rest import GatewayClient, GatewayError

__all__ = ["ExecutionResult", "GatewayClient", "GatewayError", "KernelChannels"]
