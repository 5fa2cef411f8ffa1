"""The method's building blocks shared by the stages: constitution, feedback, generation, Elo, rewards."""
