"""Other gateways measured side by side with Strata, each installed by the benchmark itself."""
