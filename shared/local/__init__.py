"""The local runtime: Baton's handlers on one machine, with moto standing in for AWS."""
