"""The servers the fan-out benchmark compares: two baselines and the service, each with the same event producer."""
