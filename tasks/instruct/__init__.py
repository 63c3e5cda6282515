"""PathGen-Instruct: instruction conversations per slide from the revised descriptions of its pairs."""
