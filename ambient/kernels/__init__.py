"""Fused kernels with exact PyTorch references; `masked_mse` dispatches between them."""

from ambient.kernels.masked_loss import (
    MaskedMSEFunction,
    masked_mse,
    masked_mse_fused,
    masked_mse_reference,
)

__all__ = ["MaskedMSEFunction", "masked_mse", "masked_mse_fused", "masked_mse_reference"]
