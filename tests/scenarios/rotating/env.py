from tests.scenarios import environment

environment.run()
