"""What the commands do, built on plans and anatomy: recipes, hashes, component tools."""
