"""The draft → verify loop and what it needs: trees, verification, sampling, budgets, costs."""
