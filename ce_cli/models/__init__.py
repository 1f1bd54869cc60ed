"""Loss models: softmax cross-entropy and sigmoid BCE as (N, C) row matrices with their targets."""
