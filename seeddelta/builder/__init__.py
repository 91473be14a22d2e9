"""The builder (`seeddelta build`): plan → encode → assemble → write, and report.json."""
