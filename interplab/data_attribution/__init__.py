"""interplab.data_attribution"""
